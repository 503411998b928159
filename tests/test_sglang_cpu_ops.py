"""The PyTorch stand-ins for sgl_kernel's CPU ops (``sglang_ext/testing/sglang_cpu/stand_in/common_ops.py``).

Each op is checked against a reference that does not share its code:

- speculative bookkeeping (tree build, greedy verify, tree-mask reconstruction, cache-loc assignment, bonus /
  accept fills, draft-decode metadata): SGLang's own ``@triton.jit`` kernels from the installed wheel, executed by
  Triton's CPU interpreter in one child process (``triton_reference.run_cases``), on random EAGLE trees drawn the
  way SGLang's draft loop draws them and random NGRAM-style trees, over several seeds;
- ``copy_all_layer_kv_cache_cpu``: a plain tensor copy (the Triton kernel works on raw device addresses, which a
  child process cannot share);
- attention: ``torch.nn.functional.scaled_dot_product_attention`` per request with an explicit boolean mask (and a
  plain softmax where SDPA has no equivalent: logit capping, attention sinks);
- norms, activation, RoPE, linear: torch / SGLang's native formulas.

Needs the ``sglang`` extra (skipped without it). No server is started.
"""

from __future__ import annotations

import math
import sys

import pytest

from conftest import require_module

require_module("sglang")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sglang_ext.testing.sglang_cpu import STAND_IN_DIR  # noqa: E402

if str(STAND_IN_DIR) not in sys.path:
    sys.path.insert(0, str(STAND_IN_DIR))
import common_ops  # noqa: E402,F401  (registers torch.ops.sgl_kernel.*)

OPS = torch.ops.sgl_kernel
SEEDS = (0, 1, 2, 3)
FULL_MASK, QLEN_ONLY, QLEN_ONLY_BITPACKING = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------------
# Random inputs
# ----------------------------------------------------------------------------------------------------------------


def eagle_draft(bs: int, topk: int, steps: int, n: int, gen: torch.Generator):
    """(parent_list, top_scores_index, draft_tokens) as SGLang's EAGLE draft loop produces them.

    Random draft probabilities go through the same selection as ``spec_utils._select_top_k_tokens_first/_later``
    and then SGLang's own ``eagle_utils.organize_draft_results``.
    """
    from sglang.srt.speculative.eagle_utils import organize_draft_results

    vocab = 1000
    topk_p = torch.rand(bs, topk, generator=gen).sort(dim=-1, descending=True).values
    topk_index = torch.randint(0, vocab, (bs, topk), generator=gen)
    scores = topk_p
    score_list, token_list = [topk_p.unsqueeze(1)], [topk_index]
    parents_list = [torch.arange(-1, topk).expand(bs, -1)]
    for i in range(1, steps):
        p = torch.rand(bs * topk, topk, generator=gen).sort(dim=-1, descending=True).values
        idx = torch.randint(0, vocab, (bs * topk, topk), generator=gen)
        expand = scores.unsqueeze(2) * p.view(bs, topk, topk)
        scores, cs_index = torch.topk(expand.flatten(1), topk, dim=-1)
        score_list.append(expand)
        token_list.append(idx.view(bs, topk * topk))
        parents_list.append(cs_index + topk * topk * (i - 1) + topk)
    return organize_draft_results(score_list, token_list, parents_list, n)


def tree_buffers(bs: int, n: int, seq_lens: torch.Tensor, mode: int) -> dict[str, torch.Tensor]:
    """Fresh output buffers, filled the way SGLang's ``build_tree_kernel_efficient`` fills them."""
    size = {FULL_MASK: int(seq_lens.sum()) * n + n * n * bs, QLEN_ONLY: n * n * bs}[mode]
    return {
        "tree_mask": torch.ones(size, dtype=torch.bool),
        "positions": torch.full((bs * n,), -7, dtype=torch.int64),
        "retrive_index": torch.full((bs, n), -1, dtype=torch.int64),
        "retrive_next_token": torch.full((bs, n), -1, dtype=torch.int64),
        "retrive_next_sibling": torch.full((bs, n), -1, dtype=torch.int64),
    }


TREE_CONFIGS = [  # (bs, topk, steps, draft tokens)
    (3, 1, 3, 4), (2, 2, 3, 6), (2, 4, 4, 8), (1, 4, 5, 8), (3, 2, 2, 4), (2, 8, 3, 16),
]


def tree_cases():
    """Every (config, seed, mask mode) combination with its inputs."""
    cases = []
    for ci, (bs, topk, steps, n) in enumerate(TREE_CONFIGS):
        for seed in SEEDS:
            gen = torch.Generator().manual_seed(1000 * ci + seed)
            parent_list, selected, draft_tokens = eagle_draft(bs, topk, steps, n, gen)
            seq_lens = torch.randint(1, 40, (bs,), generator=gen)
            for mode in (FULL_MASK, QLEN_ONLY):
                cases.append(dict(cfg=(bs, topk, steps, n), seed=seed, mode=mode, parent_list=parent_list,
                                  selected=selected, draft_tokens=draft_tokens, seq_lens=seq_lens, gen=gen))
    return cases


def ancestor_masks(bs: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """NGRAM-style trees: node 0 is the root, ``parent(i) < i``; ``mask[b, i, j]`` = j is i or an ancestor of i."""
    mask = torch.zeros(bs, n, n, dtype=torch.bool)
    for b in range(bs):
        for i in range(n):
            mask[b, i, i] = True
            if i:
                p = int(torch.randint(0, i, (1,), generator=gen))
                mask[b, i] |= mask[b, p]
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Triton references (one child process for every case of this module)
# ----------------------------------------------------------------------------------------------------------------

SPEC = "sglang.kernels.ops.speculative"


@pytest.fixture(scope="module")
def triton_results():
    """Run every Triton reference case once; returns {key: (inputs, args after the call)}."""
    from sglang_ext.testing.sglang_cpu.triton_reference import run_cases

    cases: dict[str, tuple[dict, dict]] = {}

    for c in tree_cases():
        bs, topk, steps, n = c["cfg"]
        buf = tree_buffers(bs, n, c["seq_lens"], c["mode"])
        args = [c["parent_list"], c["selected"], c["seq_lens"], buf["tree_mask"], buf["positions"],
                buf["retrive_index"], buf["retrive_next_token"], buf["retrive_next_sibling"], topk, steps, n, c["mode"]]
        cases[f"build_tree/{c['cfg']}/{c['seed']}/{c['mode']}"] = (
            c, {"target": f"{SPEC}.spec_tree:sgl_build_tree_kernel_triton", "grid": None, "args": args})

    for key, (c, case) in list(cases.items()):
        if c["mode"] != QLEN_ONLY:
            continue
        bs, topk, steps, n = c["cfg"]
        buf = tree_buffers(bs, n, c["seq_lens"], QLEN_ONLY)
        OPS.build_tree_kernel_efficient_cpu(c["parent_list"], c["selected"], c["seq_lens"], buf["tree_mask"],
                                            buf["positions"], buf["retrive_index"], buf["retrive_next_token"],
                                            buf["retrive_next_sibling"], topk, steps, n, QLEN_ONLY)
        bonus = torch.randint(0, 1000, (bs,), generator=c["gen"])
        candidates = torch.cat([bonus.unsqueeze(1), c["draft_tokens"]], dim=1)
        # Target argmax per node: mostly a child's draft token (so walks go deep), else a random token.
        target = torch.randint(0, 1000, (bs, n), generator=c["gen"])
        for b in range(bs):
            for i in range(n):
                child = int(buf["retrive_next_token"][b, i])
                while child != -1 and torch.rand(1, generator=c["gen"]) < 0.4:
                    child = int(buf["retrive_next_sibling"][b, child])
                if child != -1 and torch.rand(1, generator=c["gen"]) < 0.8:
                    target[b, i] = candidates[b, child]
        verify = dict(candidates=candidates, target=target, spec=steps + 1, **buf)
        args = [torch.full((bs * n,), -1, dtype=torch.int64), torch.full((bs, steps + 1), -1, dtype=torch.int64),
                torch.zeros(bs, dtype=torch.int64), candidates, buf["retrive_index"], buf["retrive_next_token"],
                buf["retrive_next_sibling"], target]
        cases["verify/" + key] = (verify, {"target": f"{SPEC}.spec_tree:verify_tree_greedy_triton", "grid": None,
                                           "args": args})

    for seed in SEEDS:
        for bs, n in ((1, 4), (3, 8), (2, 12), (4, 5)):
            gen = torch.Generator().manual_seed(seed * 97 + n)
            mask = ancestor_masks(bs, n, gen).flatten()
            seq = torch.randint(1, 50, (bs,), generator=gen)
            inputs = dict(mask=mask, seq=seq, bs=bs, n=n)
            args = [mask, seq, torch.zeros(bs * n, dtype=torch.int64), torch.zeros(bs * n, dtype=torch.int64),
                    torch.zeros(bs * n, dtype=torch.int64), torch.zeros(bs * n, dtype=torch.int64), bs, n]
            cases[f"reconstruct/{seed}/{bs}/{n}"] = (inputs, {
                "target": f"{SPEC}.reconstruct_tree:reconstruct_indices_from_tree_mask_triton", "grid": None,
                "args": args})

    for seed in SEEDS:
        gen = torch.Generator().manual_seed(500 + seed)
        bs, pool_len, rows = 4, 64, 6
        req_to_token = torch.randint(0, 5000, (rows, pool_len), generator=gen, dtype=torch.int32)
        rpi = torch.randperm(rows, generator=gen)[:bs]
        start = torch.randint(0, 20, (bs,), generator=gen)
        end = start + torch.randint(0, 30, (bs,), generator=gen)
        total = int((end - start).sum())
        out_loc = torch.randint(0, 5000, (total,), generator=gen)
        base = dict(req_to_token=req_to_token, rpi=rpi, start=start, end=end, out_loc=out_loc, pool_len=pool_len)
        cases[f"extend_locs/{seed}"] = (base, {
            "target": f"{SPEC}.cache_locs:assign_extend_cache_locs", "grid": (bs,),
            "args": [rpi, req_to_token, start, end, torch.full((total,), -1, dtype=torch.int64), pool_len, 4]})
        cases[f"req_to_token/{seed}"] = (base, {
            "target": "sglang.srt.mem_cache.allocation:assign_req_to_token_pool", "grid": (bs,),
            "args": [rpi, req_to_token.clone(), start, end, out_loc, pool_len, 4]})
        topk, steps = (1, 2, 4)[seed % 3], 3
        seq = torch.randint(1, 40, (bs,), generator=gen)
        draft = dict(base, topk=topk, steps=steps, seq=seq)
        cases[f"draft_locs/{seed}"] = (draft, {
            "target": f"{SPEC}.cache_locs:assign_draft_cache_locs_contiguous", "grid": (bs,),
            "args": [rpi, req_to_token, seq, torch.full((bs * topk * steps,), -1, dtype=torch.int64), pool_len,
                     topk, steps], "kwargs": {"BS": bs}})
        width = 8192
        cases[f"draft_decode/{seed}"] = (draft, {
            "target": f"{SPEC}.cache_locs:generate_draft_decode_kv_indices", "grid": (steps, bs, topk),
            "args": [rpi, req_to_token, seq, torch.full((steps, width), -1, dtype=torch.int64),
                     torch.zeros((steps, bs * topk + 1), dtype=torch.int64), torch.zeros(bs * topk, dtype=torch.int64),
                     pool_len, width, bs * topk + 1, 4, 4, 16, 1]})
        stride = steps + 1
        accept_lens = torch.randint(1, stride + 1, (bs,), generator=gen)
        accept_tokens = torch.randint(0, 1000, (bs * stride,), generator=gen)
        cases[f"bonus/{seed}"] = (dict(accept_tokens=accept_tokens, accept_lens=accept_lens, stride=stride), {
            "target": f"{SPEC}.eagle:fill_bonus_tokens", "grid": (bs,),
            "args": [accept_tokens, accept_lens, torch.full((bs,), -1, dtype=torch.int64), stride]})
        accept_index = torch.arange(bs * stride).view(bs, stride)
        accept_index = torch.where(torch.arange(stride) < accept_lens.view(bs, 1), accept_index, -1).flatten()
        out_cache_loc = torch.randint(0, 5000, (bs * stride,), generator=gen)
        size = accept_index.numel()
        cases[f"accept_loc/{seed}"] = (dict(accept_index=accept_index, out_cache_loc=out_cache_loc), {
            "target": f"{SPEC}.eagle:fill_accept_out_cache_loc", "grid": (size,),
            "args": [accept_index, out_cache_loc, torch.full((size,), -1, dtype=torch.int64),
                     1 << (size - 1).bit_length()]})

    keys = list(cases)
    results = run_cases([cases[k][1] for k in keys])
    return {k: (cases[k][0], r) for k, r in zip(keys, results)}


def _pick(results: dict, prefix: str) -> list:
    found = [(k, v) for k, v in results.items() if k.startswith(prefix)]
    assert found, f"no Triton reference cases for {prefix}"
    return found


# ----------------------------------------------------------------------------------------------------------------
# Speculative bookkeeping vs SGLang's Triton kernels
# ----------------------------------------------------------------------------------------------------------------


def test_build_tree_matches_sglang_triton(triton_results):
    for key, (c, ref) in _pick(triton_results, "build_tree/"):
        bs, topk, steps, n = c["cfg"]
        buf = tree_buffers(bs, n, c["seq_lens"], c["mode"])
        OPS.build_tree_kernel_efficient_cpu(c["parent_list"], c["selected"], c["seq_lens"], buf["tree_mask"],
                                            buf["positions"], buf["retrive_index"], buf["retrive_next_token"],
                                            buf["retrive_next_sibling"], topk, steps, n, c["mode"])
        names = ["tree_mask", "positions", "retrive_index", "retrive_next_token", "retrive_next_sibling"]
        for name, expected in zip(names, ref[3:8]):
            assert torch.equal(buf[name], expected), f"{key}: {name} differs from SGLang's Triton kernel"


def test_build_tree_bitpacked_mask_is_the_qlen_mask_packed():
    """QLEN_ONLY_BITPACKING has no Triton reference (SGLang's Triton port rejects it): check it packs the
    QLEN_ONLY rows (bit j = column j) of the same tree."""
    for c in tree_cases():
        if c["mode"] != QLEN_ONLY:
            continue
        bs, topk, steps, n = c["cfg"]
        buf = tree_buffers(bs, n, c["seq_lens"], QLEN_ONLY)
        OPS.build_tree_kernel_efficient_cpu(c["parent_list"], c["selected"], c["seq_lens"], buf["tree_mask"],
                                            buf["positions"], buf["retrive_index"], buf["retrive_next_token"],
                                            buf["retrive_next_sibling"], topk, steps, n, QLEN_ONLY)
        dtype = torch.uint8 if n <= 8 else torch.uint16 if n <= 16 else torch.uint32
        packed = torch.zeros(bs * n, dtype=dtype)
        other = tree_buffers(bs, n, c["seq_lens"], QLEN_ONLY)
        OPS.build_tree_kernel_efficient_cpu(c["parent_list"], c["selected"], c["seq_lens"], packed,
                                            other["positions"], other["retrive_index"], other["retrive_next_token"],
                                            other["retrive_next_sibling"], topk, steps, n, QLEN_ONLY_BITPACKING)
        rows = buf["tree_mask"].view(bs * n, n).to(torch.int64)
        expected = (rows * (1 << torch.arange(n))).sum(-1)
        got = packed.to(torch.int64) if dtype != torch.uint32 else packed.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        assert torch.equal(got, expected), f"{c['cfg']} seed {c['seed']}: bit-packed rows differ"
        assert torch.equal(other["positions"], buf["positions"])


def test_verify_tree_greedy_matches_sglang_triton(triton_results):
    accepted = 0
    for key, (v, ref) in _pick(triton_results, "verify/"):
        bs, n = v["candidates"].shape
        predicts = torch.full((bs * n,), -1, dtype=torch.int64)
        accept_index = torch.full((bs, v["spec"]), -1, dtype=torch.int64)
        accept_num = torch.zeros(bs, dtype=torch.int64)
        OPS.verify_tree_greedy_cpu(predicts, accept_index, accept_num, v["candidates"], v["retrive_index"],
                                   v["retrive_next_token"], v["retrive_next_sibling"], v["target"])
        assert torch.equal(predicts, ref[0]), f"{key}: predicts differ"
        assert torch.equal(accept_index, ref[1]), f"{key}: accept_index differs"
        assert torch.equal(accept_num, ref[2]), f"{key}: accept_token_num differs"
        accepted += int(accept_num.sum())
    assert accepted > 20, "the random targets should make the walk accept draft tokens"


def test_reconstruct_indices_matches_sglang_triton(triton_results):
    for key, (c, ref) in _pick(triton_results, "reconstruct/"):
        bs, n = c["bs"], c["n"]
        outs = [torch.full((bs * n,), 99, dtype=torch.int64) for _ in range(4)]
        OPS.reconstruct_indices_from_tree_mask_cpu(c["mask"], c["seq"], *outs, bs, n)
        for name, got, expected in zip(["positions", "retrive_index", "next_token", "next_sibling"], outs, ref[2:6]):
            assert torch.equal(got, expected), f"{key}: {name} differs"


def test_assign_extend_cache_locs_matches_sglang_triton(triton_results):
    for key, (c, ref) in _pick(triton_results, "extend_locs/"):
        out = torch.full_like(ref[4], -1)
        OPS.assign_extend_cache_locs_cpu(c["rpi"], c["req_to_token"], c["start"], c["end"], out, c["pool_len"])
        assert torch.equal(out, ref[4]), key


def test_assign_req_to_token_pool_matches_sglang_triton(triton_results):
    for key, (c, ref) in _pick(triton_results, "req_to_token/"):
        table = c["req_to_token"].clone()
        OPS.assign_req_to_token_pool_cpu(c["rpi"], table, c["start"], c["end"], c["out_loc"], c["pool_len"])
        assert torch.equal(table, ref[1]), key
        assert not torch.equal(table, c["req_to_token"]) or int((c["end"] - c["start"]).sum()) == 0


def test_assign_draft_cache_locs_matches_sglang_triton(triton_results):
    for key, (c, ref) in _pick(triton_results, "draft_locs/"):
        out = torch.full_like(ref[3], -1)
        OPS.assign_draft_cache_locs_contiguous_cpu(c["rpi"], c["req_to_token"], c["seq"], out, c["pool_len"],
                                                   c["topk"], c["steps"])
        assert torch.equal(out, ref[3]), key


def test_build_draft_decode_metadata_matches_sglang_kv_indices(triton_results):
    """Row ``b*topk + k`` of the stand-in's table, cut at ``seq_len + step + 1``, must list exactly the KV slots
    SGLang's Triton ``generate_draft_decode_kv_indices`` emits for request b, branch k, draft step ``step``."""
    for key, (c, ref) in _pick(triton_results, "draft_decode/"):
        topk, steps, seq = c["topk"], c["steps"], c["seq"].tolist()
        table = OPS.build_draft_decode_metadata_cpu(c["req_to_token"], c["rpi"], c["seq"], topk, steps, c["pool_len"])
        kv_indices = ref[3]
        for step in range(steps):
            iters = step + 1
            for b, seq_len in enumerate(seq):
                for k in range(topk):
                    off = sum(seq[:b]) * topk + b * iters * topk + k * (seq_len + iters)
                    expected = kv_indices[step, off:off + seq_len + iters]
                    got = table[b * topk + k, :seq_len + iters].to(torch.int64)
                    assert torch.equal(got, expected), f"{key}: step {step} request {b} branch {k}"


def test_fill_bonus_tokens_matches_sglang_triton(triton_results):
    for key, (c, ref) in _pick(triton_results, "bonus/"):
        out = torch.full_like(ref[2], -1)
        OPS.fill_bonus_tokens_cpu(c["accept_tokens"], c["accept_lens"], out, c["stride"])
        assert torch.equal(out, ref[2]), key


def test_fill_accept_out_cache_loc_matches_sglang_triton(triton_results):
    for key, (c, ref) in _pick(triton_results, "accept_loc/"):
        out = torch.full_like(ref[2], -1)
        OPS.fill_accept_out_cache_loc_cpu(c["accept_index"], c["out_cache_loc"], out)
        assert torch.equal(out, ref[2]), key


def test_copy_all_layer_kv_cache_moves_rows_in_every_buffer():
    """Against a plain copy; src and tgt overlap, so the op must read all sources before writing."""
    gen = torch.Generator().manual_seed(0)
    buffers = [torch.randn(50, 3, 8, generator=gen), torch.randn(50, 3, 8, generator=gen).to(torch.bfloat16)]
    expected = [b.clone() for b in buffers]
    src = torch.tensor([5, 6, 7, 8, 20])
    tgt = torch.tensor([6, 7, 8, 9, 2])
    for e in expected:
        e[tgt] = e[src].clone()
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.element_size() for b in buffers])
    OPS.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for got, want in zip(buffers, expected):
        assert torch.equal(got, want)


def test_store_cache_scatters_rows():
    k_cache, v_cache = torch.zeros(20, 2, 4), torch.zeros(20, 2, 4)
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    idx = torch.tensor([4, 0, 17])
    OPS.store_cache_cpu(k, v, k_cache, v_cache, idx, 8)
    assert torch.equal(k_cache[idx], k) and torch.equal(v_cache[idx], v)
    assert k_cache.abs().sum() == k.abs().sum()


# ----------------------------------------------------------------------------------------------------------------
# Attention vs SDPA
# ----------------------------------------------------------------------------------------------------------------

H, HKV, D = 6, 2, 16
SCALE = 1.0 / math.sqrt(D)
ATOL = 2e-5


def kv_pool(gen: torch.Generator, seq_lens: list[int], pool_rows: int = 400, pool_len: int = 128):
    """A KV cache with each request's tokens at scattered slots, and its req_to_token table (rows permuted)."""
    k_buf = torch.randn(pool_rows, HKV, D, generator=gen)
    v_buf = torch.randn(pool_rows, HKV, D, generator=gen)
    slots = torch.randperm(pool_rows, generator=gen)
    req_to_token = torch.zeros(len(seq_lens) + 3, pool_len, dtype=torch.int32)
    rpi = torch.randperm(len(seq_lens) + 3, generator=gen)[:len(seq_lens)]
    used = 0
    for i, length in enumerate(seq_lens):
        req_to_token[rpi[i], :length] = slots[used:used + length].to(torch.int32)
        used += length
    return k_buf, v_buf, req_to_token, rpi


def sdpa_reference(q, k, v, allowed):
    """Per request: q [E, H, D], k/v [L, HKV, D], allowed [E, L] -> [E, H, D] via SDPA with GQA."""
    out = F.scaled_dot_product_attention(q.permute(1, 0, 2).unsqueeze(0), k.permute(1, 0, 2).unsqueeze(0),
                                         v.permute(1, 0, 2).unsqueeze(0), attn_mask=allowed, scale=SCALE,
                                         enable_gqa=True)
    return out.squeeze(0).permute(1, 0, 2)


def run_extend(seed: int, mode: str, pass_new_kv: bool = True, window: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ext = [4, 4, 4] if mode == "tree" else [3, 7, 1]
    prefix = [5, 0, 12]
    lens = [p + e for p, e in zip(prefix, ext)]
    k_buf, v_buf, req_to_token, rpi = kv_pool(gen, lens)
    total = sum(ext)
    q = torch.randn(total, H, D, generator=gen)
    starts = [sum(ext[:i]) for i in range(len(ext))]
    k_new = torch.cat([k_buf[req_to_token[rpi[i], prefix[i]:lens[i]].long()] for i in range(3)])
    v_new = torch.cat([v_buf[req_to_token[rpi[i], prefix[i]:lens[i]].long()] for i in range(3)])
    tree = ancestor_masks(3, 4, gen) if mode == "tree" else None
    out = torch.full((total, H, D), float("nan"))
    OPS.extend_attention_cpu(q, k_new if pass_new_kv else None, v_new if pass_new_kv else None, out, k_buf, v_buf,
                             1.0, 1.0, req_to_token, rpi, torch.tensor(lens), torch.tensor(ext), torch.tensor(starts),
                             max(ext), SCALE, 0.0, False, window, None, None,
                             None if tree is None else tree.flatten(), mode != "full")
    for i in range(3):
        locs = req_to_token[rpi[i], :lens[i]].long()
        allowed = torch.ones(ext[i], lens[i], dtype=torch.bool)
        if mode == "causal":
            allowed = torch.arange(lens[i]).unsqueeze(0) <= torch.arange(prefix[i], lens[i]).unsqueeze(1)
        elif mode == "tree":
            allowed[:, prefix[i]:] = tree[i]
        if window:
            allowed &= torch.arange(lens[i]).unsqueeze(0) > torch.arange(prefix[i], lens[i]).unsqueeze(1) - window
        expected = sdpa_reference(q[starts[i]:starts[i] + ext[i]], k_buf[locs], v_buf[locs], allowed)
        torch.testing.assert_close(out[starts[i]:starts[i] + ext[i]], expected, atol=ATOL, rtol=1e-5,
                                   msg=lambda m: f"seed {seed} mode {mode} request {i}: {m}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["causal", "tree", "full"])
def test_extend_attention_matches_sdpa(seed, mode):
    run_extend(seed, mode)


def test_extend_attention_reads_new_tokens_from_cache_when_k_extend_is_none():
    run_extend(5, "causal", pass_new_kv=False)
    run_extend(6, "tree", pass_new_kv=False)


def test_extend_attention_sliding_window():
    run_extend(7, "causal", window=4)


def test_extend_attention_accepts_full_mask_layout():
    """FULL_MASK rows ([E, seq_len] per request, prefix columns included) give the same result as QLEN_ONLY."""
    gen = torch.Generator().manual_seed(11)
    lens, ext = [9, 6], [4, 4]
    k_buf, v_buf, req_to_token, rpi = kv_pool(gen, lens)
    q = torch.randn(8, H, D, generator=gen)
    tree = ancestor_masks(2, 4, gen)
    full = torch.cat([torch.cat([torch.ones(4, s - 4, dtype=torch.bool), tree[i]], 1).flatten()
                      for i, s in enumerate(lens)])
    outs = []
    for mask in (tree.flatten(), full):
        out = torch.empty(8, H, D)
        OPS.extend_attention_cpu(q, None, None, out, k_buf, v_buf, 1.0, 1.0, req_to_token, rpi, torch.tensor(lens),
                                 torch.tensor(ext), torch.tensor([0, 4]), 4, SCALE, 0.0, False, 0, None, None, mask,
                                 True)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_extend_attention_logit_cap_and_sinks_match_plain_softmax():
    gen = torch.Generator().manual_seed(3)
    lens, ext, cap = [10], [4], 2.5
    k_buf, v_buf, req_to_token, rpi = kv_pool(gen, lens)
    q = torch.randn(4, H, D, generator=gen) * 3
    sinks = torch.randn(H, generator=gen)
    out = torch.empty(4, H, D)
    OPS.extend_attention_cpu(q, None, None, out, k_buf, v_buf, 1.0, 1.0, req_to_token, rpi, torch.tensor(lens),
                             torch.tensor(ext), torch.tensor([0]), 4, SCALE, cap, False, 0, None, sinks, None, True)
    locs = req_to_token[rpi[0], :10].long()
    k = k_buf[locs].repeat_interleave(H // HKV, dim=1)
    v = v_buf[locs].repeat_interleave(H // HKV, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * SCALE
    s = cap * torch.tanh(s / cap)
    s = s.masked_fill(~(torch.arange(10).view(1, 1, 10) <= torch.arange(6, 10).view(1, 4, 1)), float("-inf"))
    s = torch.cat([s, sinks.view(H, 1, 1).expand(H, 4, 1)], -1)
    expected = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1)[..., :-1], v)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_decode_attention_writes_kv_and_matches_sdpa(seed):
    gen = torch.Generator().manual_seed(seed)
    lens = [1, 17, 6, 30]
    k_buf, v_buf, req_to_token, rpi = kv_pool(gen, lens)
    bs = len(lens)
    q = torch.randn(bs, H, D, generator=gen)
    key, value = torch.randn(bs, HKV * D, generator=gen), torch.randn(bs, HKV * D, generator=gen)
    loc = torch.stack([req_to_token[rpi[i], lens[i] - 1].long() for i in range(bs)])
    out = torch.full((bs, H, D), float("nan"))
    attn_logits = torch.zeros(bs, H, 8, D + 1)
    OPS.decode_attention_cpu(q, k_buf, v_buf, 1.0, 1.0, out, key, value, loc, attn_logits, req_to_token, rpi,
                             torch.tensor(lens), SCALE, 0.0, False, 0, None, None)
    assert torch.equal(k_buf[loc], key.view(bs, HKV, D)) and torch.equal(v_buf[loc], value.view(bs, HKV, D))
    for i in range(bs):
        locs = req_to_token[rpi[i], :lens[i]].long()
        expected = sdpa_reference(q[i:i + 1], k_buf[locs], v_buf[locs], None)
        torch.testing.assert_close(out[i:i + 1], expected, atol=ATOL, rtol=1e-5)


def test_decode_attention_sliding_window_and_bf16_cache():
    gen = torch.Generator().manual_seed(9)
    lens, window = [12, 3], 5
    k_buf, v_buf, req_to_token, rpi = kv_pool(gen, lens)
    k_buf, v_buf = k_buf.to(torch.bfloat16), v_buf.to(torch.bfloat16)
    q = torch.randn(2, H, D, generator=gen)
    out = torch.empty(2, H, D)
    OPS.decode_attention_cpu(q, k_buf, v_buf, 1.0, 1.0, out, None, None, torch.zeros(2, dtype=torch.int64),
                             torch.zeros(2, H, 8, D + 1), req_to_token, rpi, torch.tensor(lens), SCALE, 0.0, False,
                             window, None, None)
    for i, length in enumerate(lens):
        locs = req_to_token[rpi[i], max(0, length - window):length].long()
        expected = sdpa_reference(q[i:i + 1], k_buf[locs].float(), v_buf[locs].float(), None)
        torch.testing.assert_close(out[i:i + 1], expected, atol=ATOL, rtol=1e-5)


def test_flash_attn_varlen_matches_sdpa():
    gen = torch.Generator().manual_seed(4)
    cu = torch.tensor([0, 5, 12, 13])
    q, k, v = (torch.randn(13, H, D, generator=gen) for _ in range(3))
    for causal in (False, True):
        out = OPS.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal, SCALE)
        for i in range(3):
            s, e = int(cu[i]), int(cu[i + 1])
            expected = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                      v[s:e].transpose(0, 1), is_causal=causal, scale=SCALE)
            torch.testing.assert_close(out[s:e], expected.transpose(0, 1), atol=ATOL, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Dense ops vs torch / SGLang's native formulas
# ----------------------------------------------------------------------------------------------------------------


def test_rmsnorm_and_fused_add_rmsnorm():
    gen = torch.Generator().manual_seed(0)
    x, res, w = torch.randn(5, 32, generator=gen), torch.randn(5, 32, generator=gen), torch.randn(32, generator=gen)
    torch.testing.assert_close(OPS.rmsnorm_cpu(x, w, 1e-5), F.rms_norm(x, (32,), w, 1e-5))
    x2, res2 = x.clone(), res.clone()
    OPS.fused_add_rmsnorm_cpu(x2, res2, w, 1e-5)
    torch.testing.assert_close(res2, x + res)
    torch.testing.assert_close(x2, F.rms_norm(x + res, (32,), w, 1e-5))


def test_silu_and_mul():
    x = torch.randn(4, 2 * 24, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(OPS.silu_and_mul_cpu(x), F.silu(x[:, :24]) * x[:, 24:])


@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_embedding_matches_sglang_formula(is_neox):
    """Against SGLang's ``apply_rotary_emb`` applied as ``RotaryEmbedding.forward_native`` does (partial rotary)."""
    from sglang.srt.layers.rotary_embedding.utils import apply_rotary_emb

    gen = torch.Generator().manual_seed(2)
    head, rot, max_pos = 16, 8, 64
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    pos = torch.randint(0, max_pos, (7,), generator=gen)
    q, k = torch.randn(7, 3 * head, generator=gen), torch.randn(7, 1 * head, generator=gen)
    q_out, k_out = OPS.rotary_embedding_cpu(pos, q, k, head, cache, is_neox)
    cos, sin = cache[pos].chunk(2, dim=-1)
    for x, got in ((q, q_out), (k, k_out)):
        xs = x.view(7, -1, head)
        expected = torch.cat([apply_rotary_emb(xs[..., :rot], cos, sin, is_neox), xs[..., rot:]], -1)
        torch.testing.assert_close(got, expected.view_as(x))
    assert not torch.equal(q_out, q), "the op must rotate"


def test_apply_rotary_pos_emb_matches_sglang_native():
    from sglang.srt.layers.rotary_embedding.utils import apply_rotary_pos_emb_native_eager

    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(5, 4, 8, generator=gen), torch.randn(5, 2, 8, generator=gen)
    cos, sin = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    got = OPS.apply_rotary_pos_emb_cpu(q, k, cos, sin, 1)
    want = apply_rotary_pos_emb_native_eager(q, k, cos, sin, 1)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_packed_linear_is_a_plain_linear():
    gen = torch.Generator().manual_seed(4)
    w, b, x = torch.randn(16, 32, generator=gen), torch.randn(16, generator=gen), torch.randn(3, 32, generator=gen)
    packed = OPS.convert_weight_packed(w)
    assert packed.data_ptr() != w.data_ptr()
    torch.testing.assert_close(OPS.weight_packed_linear(x, packed, b, True), F.linear(x, w, b))
    torch.testing.assert_close(OPS.weight_packed_linear(x, packed, None, True), x @ w.T)


def test_thread_setup_and_initialize():
    before = torch.get_num_threads()
    try:
        message = OPS.init_cpu_threads_env("0")
        assert torch.get_num_threads() == 1 and "1 intra-op thread" in message
    finally:
        torch.set_num_threads(before)
    OPS.initialize(1, 0)
    with pytest.raises(NotImplementedError, match="tp size 2"):
        OPS.initialize(2, 0)


def test_import_time_only_ops_raise_naming_themselves():
    for name in common_ops.IMPORT_TIME_ONLY_OPS:
        with pytest.raises(NotImplementedError, match=name):
            getattr(OPS, name)(torch.zeros(1))
    # fused-path switches SGLang probes with hasattr must stay off
    assert not hasattr(OPS, "fused_qk_norm_cpu") and not hasattr(OPS, "fused_qk_norm_rope_cpu")


def test_registration_is_idempotent():
    assert common_ops.register() is False
