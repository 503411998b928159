"""Verification driven by the serving random source, at high power.

Exact mode replaces the randomness with ``ScriptedRandomSource``, so it never exercises ``TorchRandomSource``, the
source every served request uses (``Engine`` gives each request ``TorchRandomSource(seed)``). A bug there (coins
shared between positions, a generator re-created per call, a biased coin) leaves every exact test green. Here the
whole step runs on ``TorchRandomSource``: the draft tokens are drawn from ``q`` with it, verification flips its coins
and draws its residual/bonus token with it, and the tokens after the step are completed from the target with it.
Independent requests run as one batch (1M for the vectorised chain rule, 200k for the tree walk, whose result is
assembled per row in Python), and the law of the first three tokens (61 possible sequences) is tested against the
exact target law with Pearson's chi-square at ``SIGNIFICANCE = 1e-6``. With fixed seeds the verdict is deterministic;
the correct source passes with p around 0.1 to 0.9, while coins accepting 2 % too rarely (``U < 0.98 p/q``) give
p ~ 1e-33 on the 1M chain and 5e-10 on the top-k tree. The draft and target are chosen so that 0, 1 and 2 of the two
drafted tokens are accepted about equally often, so every position's coin matters.
"""

from __future__ import annotations

import pytest
import torch

from sglang_ext.core import DraftTree, TorchRandomSource, verify_chain, verify_tree
from sglang_ext.core.lossless import ToyModel, chi_square_check
from sglang_ext.core.processing import SamplingParams

SAMPLES = 200_000  # tree walk
SAMPLES_VECTORISED = 1_000_000  # verify_chain: cheap per row, so more power
SIGNIFICANCE = 1e-6
V = 4
ROOT = (0,)
TARGET = ToyModel(V, seed=69, zero_fraction=0.15)
DRAFT = ToyModel(V, seed=102, scale=1.0)  # accepts 0, 1 or 2 of 2 drafts about equally often
TARGET_PARAMS = SamplingParams(0.9)
DRAFT_PARAMS = SamplingParams(1.0)


def _tables(model: ToyModel, params: SamplingParams, depth: int) -> list[torch.Tensor]:
    """``tables[d][code]``: the model's processed distribution after ``ROOT + prefix`` for every prefix of length ``d``
    (``code`` = the prefix read as a base-``V`` number), so a batch looks distributions up by indexing."""
    out = []
    for d in range(depth + 1):
        rows = []
        for code in range(V ** d):
            prefix = tuple((code // V ** (d - 1 - i)) % V for i in range(d))
            rows.append(model.probs(ROOT + prefix, params))
        out.append(torch.stack(rows))
    return out


def _target_law(length: int) -> dict[tuple[int, ...], float]:
    p = _tables(TARGET, TARGET_PARAMS, length - 1)
    law: dict[tuple[int, ...], float] = {(): 1.0}
    for d in range(length):
        law = {seq + (t,): w * float(p[d][_code(seq)][t]) for seq, w in law.items() for t in range(V)
               if p[d][_code(seq)][t] > 0}
    return law


def _code(seq) -> int:
    c = 0
    for t in seq:
        c = c * V + int(t)
    return c


def _complete_and_count(emitted: torch.Tensor, n_emitted: torch.Tensor, rng: TorchRandomSource,
                        p: list[torch.Tensor]) -> dict[tuple[int, ...], int]:
    """Fill positions ``>= n_emitted[b]`` of ``emitted [B, L]`` by sampling the target (with ``rng``), then count."""
    B, L = emitted.shape
    code = torch.zeros(B, dtype=torch.long)
    out = emitted.clone()
    for j in range(L):
        sampled = rng.categorical(p[j][code])
        out[:, j] = torch.where(j < n_emitted, out[:, j], sampled)
        code = code * V + out[:, j]
    counts = torch.bincount(code, minlength=V ** L).tolist()
    return {tuple((c // V ** (L - 1 - i)) % V for i in range(L)): n for c, n in enumerate(counts) if n}


def _draft_chains(rng: TorchRandomSource, B: int, K: int):
    """``B`` chains of ``K`` tokens drawn from the draft with ``rng``: tokens, the q's, the target at every node."""
    q, p = _tables(DRAFT, DRAFT_PARAMS, K - 1), _tables(TARGET, TARGET_PARAMS, K)
    code = torch.zeros(B, dtype=torch.long)
    tokens, qs, ps = [], [], [p[0][code]]
    for i in range(K):
        qi = q[i][code]
        x = rng.categorical(qi)
        code = code * V + x
        tokens.append(x)
        qs.append(qi)
        ps.append(p[i + 1][code])
    return torch.stack(tokens, 1), torch.stack(qs, 1), torch.stack(ps, 1)


def _same_shape_children(tree: DraftTree, one: DraftTree) -> None:
    """Every row of ``tree`` has ``one``'s shape: share its ``children`` (a per-row Python loop, checked in
    ``test_tree.py``) instead of recomputing it 200k times."""
    assert torch.equal(tree.parents, one.parents.expand_as(tree.parents))
    tree.__dict__["children"] = one.children.expand(tree.batch_size, -1, -1)


def chain_step(rng: TorchRandomSource, B: int, K: int, walk: bool) -> dict[tuple[int, ...], int]:
    tokens, q, p = _draft_chains(rng, B, K)
    if walk:  # the engine's path for a sampled request: a chain-scheme tree and the tree walk
        tree = DraftTree.chain(torch.full((B,), ROOT[-1]), tokens, q)
        _same_shape_children(tree, DraftTree.chain(torch.tensor(ROOT[-1:]), tokens[:1], q[:1]))
        result = verify_tree(tree, p, rng)
        n_acc, nxt = result.num_accepted, result.next_token
    else:
        n_acc, nxt = verify_chain(tokens, q, p, rng)
    emitted = torch.cat([tokens, torch.zeros(B, 1, dtype=torch.long)], dim=1)
    emitted[torch.arange(B), n_acc] = nxt
    return _complete_and_count(emitted, n_acc + 1, rng, _tables(TARGET, TARGET_PARAMS, K))


def topk_tree_step(rng: TorchRandomSource, B: int) -> dict[tuple[int, ...], int]:
    """The n-gram / EAGLE-tree path for a sampled request: a deterministic tree (the root's two most likely draft
    tokens, each with its most likely child), point-mass proposals, verified by the tree walk."""
    def top(ctx, n):
        q = DRAFT.probs(ctx, DRAFT_PARAMS)
        return torch.sort(-q, stable=True).indices[:n].tolist()

    a, b = top(ROOT, 2)
    (a2,), (b2,) = top(ROOT + (a,), 1), top(ROOT + (b,), 1)
    tokens = [ROOT[-1], a, b, a2, b2]
    parents = [-1, 0, 0, 1, 2]
    ctxs = [ROOT, ROOT + (a,), ROOT + (b,), ROOT + (a, a2), ROOT + (b, b2)]
    one = DraftTree.from_lists([tokens], [parents], "topk")
    tree = DraftTree(tokens=one.tokens.expand(B, -1).clone(), parents=one.parents.expand(B, -1).clone(), scheme="topk")
    _same_shape_children(tree, one)
    p_nodes = torch.stack([TARGET.probs(c, TARGET_PARAMS) for c in ctxs])
    result = verify_tree(tree, p_nodes.expand(B, -1, -1), rng)
    L = 3
    path_tokens = {0: [], 1: [a], 2: [b], 3: [a, a2], 4: [b, b2]}
    last = torch.tensor([path[-1] if path else 0 for path in result.accepted_nodes])
    emitted = torch.zeros(B, L, dtype=torch.long)
    for node, toks in path_tokens.items():
        rows = last == node
        for j, t in enumerate(toks + [None]):
            emitted[rows, j] = t if t is not None else result.next_token[rows]
    return _complete_and_count(emitted, result.num_accepted + 1, rng, _tables(TARGET, TARGET_PARAMS, L - 1))


@pytest.mark.parametrize("walk", [False, True], ids=["verify_chain", "verify_tree-chain"])
def test_serving_random_source_chain_is_lossless_at_high_power(walk):
    K, n = 2, SAMPLES if walk else SAMPLES_VECTORISED
    counts = chain_step(TorchRandomSource(1234 + walk), n, K, walk)
    report = chi_square_check(counts, _target_law(K + 1), n, SIGNIFICANCE)
    assert report.p_value > SIGNIFICANCE and report.total_variation < 0.01


def test_serving_random_source_topk_tree_is_lossless_at_high_power():
    counts = topk_tree_step(TorchRandomSource(4321), SAMPLES)
    report = chi_square_check(counts, _target_law(3), SAMPLES, SIGNIFICANCE)
    assert report.p_value > SIGNIFICANCE and report.total_variation < 0.01


def test_serving_random_source_is_reproducible_and_owns_its_stream():
    """Same seed, same verdicts, whatever happens to torch's global generator meanwhile; another seed differs. A
    source that forgets its generator (global RNG) or re-seeds per call fails one of these."""
    def run(seed: int, disturb: bool):
        rng = TorchRandomSource(seed)
        out = []
        for _ in range(3):
            if disturb:
                torch.rand(7)  # global generator moves
            tokens, q, p = _draft_chains(rng, 64, 2)
            out.append(torch.stack(verify_chain(tokens, q, p, rng)))
        return torch.stack(out)

    torch.manual_seed(0)
    first = run(7, disturb=False)
    torch.manual_seed(99)
    assert torch.equal(first, run(7, disturb=True))
    assert not torch.equal(first, run(8, disturb=False))
    assert not torch.equal(first[0], first[1])  # successive steps draw fresh randomness
