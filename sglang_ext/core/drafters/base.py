"""The one interface every drafter implements, whichever host (reference engine, SGLang plugin, simulator) runs it.

A host keeps live requests in batch slots ``0..B-1`` and, once per speculative step, asks the drafter for
one draft tree per request. Drafters that condition on the target's hidden states (EAGLE-style) receive them
through :meth:`Drafter.observe` after every target forward, for committed positions only, so there is never a
second target pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from ..costs import CATCH_UP_SPLIT
from ..tree import DraftTree, Scheme


@dataclass
class DraftRequest:
    """What a drafter may look at for one request in one step."""

    slot: int
    tokens: Sequence[int]  # every committed token, prompt included; the last one is the tree's root
    num_steps: int  # draft depth (chain length when ``topk == 1``)
    greedy: bool = True  # greedy requests are verified by argmax, so proposals need no q
    generator: torch.Generator | None = None  # for drafters that *sample* proposals (stochastic chains)
    want_q: bool = False  # record the proposal distribution q even for greedy requests (policy signals: KL, entropy)


@dataclass
class Draft:
    """One request's tree: node 0 is the root (last committed token); ``parents[i] < i``."""

    tokens: list[int]
    parents: list[int]
    scheme: Scheme
    draft_probs: torch.Tensor | None = None  # [N, V] q at each node (schemes that sample)
    #: [k, V] the drafter's distribution for each proposed chain token (row i proposed node i + 1), recorded when
    #: ``DraftRequest.want_q``; only for signals (KL(p||q), entropy), never used to verify a greedy request
    proposal_probs: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    def as_tree(self) -> DraftTree:
        probs = [self.draft_probs] if self.draft_probs is not None else None
        return DraftTree.from_lists([self.tokens], [self.parents], self.scheme, draft_probs=probs)

    @staticmethod
    def chain(root: int, drafted: Sequence[int], scheme: Scheme = "topk", draft_probs: torch.Tensor | None = None) -> "Draft":
        n = len(drafted)
        return Draft(tokens=[int(root), *map(int, drafted)], parents=[-1, *range(n)], scheme=scheme, draft_probs=draft_probs)


def prune_to_budget(root: int, nodes: Sequence[tuple[int, int, float, int]], budget: int) -> tuple[list[int], list[int]]:
    """Keep the ``budget`` best draft nodes by cumulative log-probability, every kept node's ancestors included.

    ``nodes[i] = (token, parent index or -1 for the root, cumulative log-prob, depth)``. Ties are broken by depth
    then creation order; an ancestor that a tie dropped is put back (the budget may then overflow by a node).
    Returns the tree as ``(tokens, parents)`` with node 0 the root and nodes in (depth, creation) order, so
    ``parents[i] < i``.
    """
    ranked = sorted(range(len(nodes)), key=lambda n: (-nodes[n][2], nodes[n][3], n))
    keep = set(ranked[:max(budget, 0)])
    for n in list(keep):
        p = nodes[n][1]
        while p >= 0 and p not in keep:
            keep.add(p)
            p = nodes[p][1]
    order = sorted(keep, key=lambda n: (nodes[n][3], n))
    new_index = {n: i + 1 for i, n in enumerate(order)}
    tokens = [int(root)] + [nodes[n][0] for n in order]
    parents = [-1] + [new_index.get(nodes[n][1], 0) for n in order]
    return tokens, parents


class Drafter(Protocol):
    """``draft`` proposes; the slot hooks keep per-request state aligned with the host's batch slots."""

    name: str
    needs_features: bool  # True: the host passes target hidden states to ``observe``

    def admit(self, slot: int) -> None: ...

    def release(self, slot: int) -> None: ...

    def move(self, src: int, dst: int) -> None: ...

    def observe(self, slot: int, features: torch.Tensor | None, next_tokens: Sequence[int]) -> None:
        """Committed positions: ``features[i]`` is the target's feature at a position whose next committed token is
        ``next_tokens[i]`` (EAGLE's (h_t, x_{t+1}) pairs)."""
        ...

    def draft(self, requests: Sequence[DraftRequest]) -> list[Draft]: ...


class StatelessDrafter:
    """Slot hooks that do nothing, for drafters that look only at the token history."""

    needs_features = False

    def admit(self, slot: int) -> None:
        pass

    def release(self, slot: int) -> None:
        pass

    def move(self, src: int, dst: int) -> None:
        pass

    def observe(self, slot: int, features: torch.Tensor | None, next_tokens: Sequence[int]) -> None:
        pass


class FeatureDrafterSlots:
    """Slot hooks of a drafter that keeps its own KV cache of committed ``(h_t, x_{t+1})`` pairs (EAGLE-style and
    SpecBlock): pairs the host hands over wait in ``pending`` until the next :meth:`draft` absorbs them.

    Subclasses set ``self.model`` (with an ``fc`` projection: its device and dtype are the pairs'), ``self.cache``
    (a :class:`~sglang_ext.core.kv_cache.SlotKVCache`), ``self.pending = {}`` and ``self.version = 0``.
    """

    name: str
    needs_features = True
    model: torch.nn.Module
    pending: dict[int, tuple[list[torch.Tensor], list[int]]]
    version: int

    def admit(self, slot: int) -> None:
        self.cache.reset(slot)
        self.pending[slot] = ([], [])

    @staticmethod
    def first_slot(requests: Sequence[DraftRequest]) -> int:
        """The first slot of a draft call; the batch must cover contiguous slots in order (one cache row each)."""
        s0 = requests[0].slot
        if [r.slot for r in requests] != list(range(s0, s0 + len(requests))):
            raise ValueError("requests must cover contiguous slots in order")
        return s0

    def release(self, slot: int) -> None:
        self.cache.reset(slot)
        self.pending.pop(slot, None)

    def move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)
        self.pending[dst] = self.pending.pop(src, ([], []))

    def observe(self, slot: int, features: torch.Tensor | None, next_tokens: Sequence[int]) -> None:
        if features is None or features.shape[0] != len(next_tokens):
            raise ValueError(f"slot {slot}: need one feature row per next token, got "
                             f"{None if features is None else tuple(features.shape)} for {len(next_tokens)} tokens")
        feats, toks = self.pending.setdefault(slot, ([], []))
        feats.append(features.detach().to(self.model.fc.weight.device, self.model.fc.weight.dtype))
        toks.extend(int(t) for t in next_tokens)

    def swap_model(self, model: torch.nn.Module) -> None:
        """Serve new weights from the next step on (the cached pairs were made by the old ones: a small, lossless mismatch)."""
        self.model = model.eval()
        self.version += 1

    #: a request with more pending pairs than this catches up alone first; the steady backlog after a speculative
    #: step is ``accepted + 1 <= num_steps + 1``, well below it
    catch_up_split = CATCH_UP_SPLIT

    def _absorb_alone(self, slot: int, tokens: torch.Tensor, features: torch.Tensor) -> None:
        """Run ``tokens [1, n]`` / ``features [1, n, F]`` (committed pairs) through the drafter for ``slot`` only,
        writing its cache at the committed length (the caller commits)."""
        raise NotImplementedError

    @torch.inference_mode()
    def _catch_up(self, first_slot: int, B: int) -> None:
        """Absorb all but the last pending pair of every request holding more than ``catch_up_split``, each alone
        (no padding to the batch's longest backlog), so the batched absorb that follows is short."""
        dev = self.model.fc.weight.device
        for b in range(B):
            slot = first_slot + b
            feats, toks = self.pending.get(slot, ([], []))
            n = len(toks)
            if n <= self.catch_up_split:
                continue
            f = feats[0] if len(feats) == 1 else torch.cat(feats, dim=0)
            self._absorb_alone(slot, torch.tensor([toks[:n - 1]], dtype=torch.long, device=dev), f[:n - 1].unsqueeze(0))
            self.cache.commit(slot, list(range(n - 1)))
            self.pending[slot] = ([f[n - 1:]], toks[n - 1:])
