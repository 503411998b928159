"""Batch-1 greedy speculative decoding on a Hugging Face causal LM: the smallest real host of the core.

One step: feed ``[last committed token] + drafts`` through the target with its KV cache (one forward),
take the argmax after every position, let :func:`sglang_ext.core.verify_greedy_chain` pick the accepted
prefix, commit it plus the target's own next token, and crop the KV cache back to what was committed.
With ``num_draft = 0`` the same loop is plain greedy decoding, so comparisons are like for like.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from sglang_ext.core.greedy import verify_greedy_chain
from sglang_ext.core.processing import check_finite


class Drafter(Protocol):
    def propose(self, tokens: Sequence[int], k: int) -> list[int]: ...


@dataclass
class GenerationResult:
    tokens: list[int]
    steps: int = 0  # target forwards in the decode phase (SGLang: spec_verify_ct)
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    accept_lengths: list[int] = field(default_factory=list)

    @property
    def mean_accept_length(self) -> float:
        """Tokens committed per target forward (SGLang's ``spec_accept_length``: accepted drafts + 1)."""
        return len(self.tokens) / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


@torch.inference_mode()
def generate_greedy(model, input_ids: Sequence[int], max_new_tokens: int, drafter: Drafter | None = None,
                    num_draft: int = 0, eos_token_ids: Sequence[int] = (), request_id: object = 0) -> GenerationResult:
    """Greedy decoding of ``max_new_tokens`` (stops after an EOS token), speculative when ``drafter`` and ``num_draft``."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    eos = set(int(t) for t in eos_token_ids)
    t0 = time.perf_counter()
    cache = DynamicCache()
    context = list(input_ids)  # the KV cache always holds all but the last token of `context`
    if len(context) > 1:  # prefill all but the last prompt token; the first step feeds that one
        model(input_ids=torch.tensor([context[:-1]], device=device), past_key_values=cache, use_cache=True)
    out: list[int] = []
    result = GenerationResult(tokens=out)
    while len(out) < max_new_tokens and not (out and out[-1] in eos):
        k = min(num_draft, max_new_tokens - len(out) - 1) if drafter is not None else 0
        draft = drafter.propose(context, k)[:k] if k > 0 else []
        step_input = torch.tensor([[context[-1]] + draft], device=device)
        logits = model(input_ids=step_input, past_key_values=cache, use_cache=True).logits  # [1, 1 + k, V]
        check_finite(logits, [request_id])
        argmax = logits.argmax(dim=-1)
        n_acc, nxt = verify_greedy_chain(torch.tensor([draft], dtype=torch.long).reshape(1, len(draft)), argmax.cpu())
        n = int(n_acc[0])
        committed = draft[:n] + [int(nxt[0])]
        if len(draft) > n:
            cache.crop(-(len(draft) - n))  # drop the K/V of rejected drafts; keep the root and accepted ones
        for tok in committed:
            if len(out) >= max_new_tokens:
                break
            out.append(tok)
            context.append(tok)
            if tok in eos:
                break
        result.steps += 1
        result.drafted += len(draft)
        result.accepted += n
        result.accept_lengths.append(len(committed))
    result.seconds = time.perf_counter() - t0
    return result
