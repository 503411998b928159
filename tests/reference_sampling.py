"""An independent, deliberately plain reference of target processing (pure Python, no torch).

Why it exists: the exact lossless checker builds both the verifier's input *and* its expected law with
:func:`sglang_ext.core.processing.process_logits`, so a bug there cancels out. Tests compare the core against
this module instead, which shares no code with it.

The convention (the one ``sglang_ext/core/processing.py`` documents, and the one SGLang's speculative
verification uses: ``sglang/srt/speculative/eagle_utils.py`` builds ``target_probs`` as
``softmax(logits / T)`` → ``top_k_renorm_prob`` → ``top_p_renorm_prob``, and
``dflash_utils.build_speculative_verify_target_probs`` says "top-k-first semantics"; vLLM and HF order
their warpers the same way):

1. **temperature first**: ``p ∝ exp(logit / T)``. The top-k/top-p sets are chosen on *this* distribution,
   not on the temperature-1 one (top-k's set does not depend on ``T``, top-p's does);
2. **top-k** (``k > 0``): keep the ``k`` most likely tokens; ties by lowest token id;
3. **top-p** (``0 < P < 1``) on the top-k set *renormalised*: walk tokens by decreasing probability (ties by
   lowest id) and keep each one whose mass-before is ``< P`` (the token that crosses ``P`` is kept; a token
   whose mass-before equals ``P`` exactly is not);
4. renormalise. ``T == 0`` or ``k == 1`` is greedy: a point mass on the first argmax of the logits.

``joint=True`` gives the other convention, the one SGLang's *non-speculative* sampler uses
(``sampler.top_k_top_p_min_p_sampling_from_probs_torch`` and FlashInfer's ``filter_apply_order="joint"``):
top-p is measured on the full distribution's cumulative mass instead of the top-k-renormalised one, and a
token whose mass-before equals ``P`` exactly is kept. The two differ only when top-k and top-p are both on
(or at exact top-p boundaries); tests pin which one each implementation follows.
"""

from __future__ import annotations

import math
from typing import Sequence


def reference_target_probs(logits: Sequence[float], temperature: float, top_k: int = -1, top_p: float = 1.0,
                           *, joint: bool = False) -> list[float]:
    """Processed target distribution of one row of ``logits`` (``-inf`` = masked token), as a list of floats."""
    logits = [float(x) for x in logits]
    V = len(logits)
    finite = [x for x in logits if x != -math.inf]
    if not finite or any(math.isnan(x) or x == math.inf for x in logits):
        raise ValueError("reference_target_probs needs finite logits (-inf allowed, not everywhere)")
    if temperature == 0.0 or top_k == 1:
        best = max(range(V), key=lambda i: (logits[i], -i))  # first argmax
        return [1.0 if i == best else 0.0 for i in range(V)]
    top = max(finite)
    weights = [0.0 if x == -math.inf else math.exp((x - top) / temperature) for x in logits]
    total = math.fsum(weights)
    probs = [w / total for w in weights]
    order = sorted(range(V), key=lambda i: (-probs[i], i))  # decreasing probability, ties by lowest id
    kept = set(order[:top_k]) if 0 < top_k < V else set(range(V))
    if top_p < 1.0:
        # joint: mass on the full distribution, boundary kept (SGLang masks `before > top_p`);
        # default: mass on the top-k set renormalised, boundary dropped (the token *crossing* top_p is kept)
        mass = 1.0 if joint else math.fsum(probs[i] for i in kept)
        before, survivors = 0.0, set()
        for i in order:
            if i not in kept:
                continue
            if (before <= top_p) if joint else (before < top_p):
                survivors.add(i)
            before += probs[i] / mass
        kept = survivors
    mass = math.fsum(probs[i] for i in kept)
    return [probs[i] / mass if i in kept else 0.0 for i in range(V)]


def top_p_margin(logits: Sequence[float], temperature: float, top_k: int = -1, top_p: float = 1.0,
                 *, joint: bool = False) -> float:
    """How far ``top_p`` is from the nearest mass-before value (``inf`` when top-p is off).

    Implementations sum in different orders, so a ``top_p`` within a few ulps of a mass-before value may fall on
    either side; property tests keep only cases with a clear margin and test exact boundaries by hand.
    """
    if top_p >= 1.0 or temperature == 0.0 or top_k == 1:
        return math.inf
    full = reference_target_probs(logits, temperature)
    V = len(full)
    order = sorted(range(V), key=lambda i: (-full[i], i))
    kept = order[:top_k] if 0 < top_k < V else order
    mass = 1.0 if joint else math.fsum(full[i] for i in kept)
    before, margin = 0.0, math.inf
    for i in kept:
        margin = min(margin, abs(before - top_p))
        before += full[i] / mass
    return margin
