r"""The EAGLE drafter's unrolled *training-time test* forward (EAGLE-3): the drafter run ``K`` draft steps deep over
whole captured sequences at once, each later step on the drafter's *own* states, exactly as they are used when
serving. One home for the offline trainer (:mod:`sglang_ext.training.drafter`), the online learners and the
deploy gate (:mod:`sglang_ext.core.learning`).

With ``h_i`` the target's feature at index ``i`` and ``x`` the tokens:

* step 1, at index ``i`` (token position ``i+1``): input ``(g = W_fc h_i, x_{i+1})``, attends causally to the
  step-1 keys ``≤ i``; output ``a^1_i`` must predict ``p_{i+1}``;
* step ``j > 1``, at index ``i``: input ``(g = a^{j-1}_{i-1}, x_{i+1})``: the state the previous draft step
  produced one position earlier, paired with the token it (ideally) drafted. It attends to step-1 keys
  ``≤ i-j+1`` (the committed context when drafting started) and to one key of each later step on its own
  diagonal (its drafted ancestors), the same set the serving cache shows it.
"""

from __future__ import annotations

import torch

from sglang_ext.core.drafters.eagle_model import EagleDraftModel


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def ttt_forward(model: EagleDraftModel, features: torch.Tensor, tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Unrolled drafter over a batch: returns draft-vocab logits ``[B, S-1, V_d]`` for steps ``1..steps``.

    Index ``i`` of every output predicts the token at position ``i + 2`` (see the module docstring).
    """
    c = model.config
    B, S = tokens.shape
    L = S - 1
    x_in = tokens[:, 1:]
    positions = torch.arange(1, S, device=tokens.device).expand(B, L)
    rep = c.num_heads // c.num_kv_heads
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    g = model.project_features(features[:, :-1])
    idx = torch.arange(L, device=tokens.device)
    for j in range(1, steps + 1):
        def attend(q, k, v, j=j):
            keys.append(_repeat_kv(k, rep))
            values.append(_repeat_kv(v, rep))
            # step-1 keys: column <= i - j + 1
            s1 = (q @ keys[0].transpose(-1, -2)) * model.scale  # [B, H, L, L]
            allowed = idx.view(1, L) <= (idx.view(L, 1) - j + 1)
            s1 = s1.masked_fill(~allowed, float("-inf"))
            parts, vals = [s1], []
            for m in range(2, j + 1):  # one diagonal key of step m at index i - (j - m)
                shift = j - m
                km = torch.roll(keys[m - 1], shifts=shift, dims=2)
                vm = torch.roll(values[m - 1], shifts=shift, dims=2)
                sm = (q * km).sum(-1, keepdim=True) * model.scale  # [B, H, L, 1]
                sm = sm.masked_fill((idx < shift).view(1, 1, L, 1), float("-inf"))
                parts.append(sm)
                vals.append(vm)
            w = torch.softmax(torch.cat(parts, dim=-1), dim=-1)
            w = torch.nan_to_num(w, nan=0.0)  # rows with no visible key (invalid positions) contribute nothing
            o = w[..., :L] @ values[0]
            for m, vm in enumerate(vals):
                o = o + w[..., L + m:L + m + 1] * vm
            return o.transpose(1, 2).reshape(B, L, -1)

        a = model.layer(x_in, g, positions, attend)
        outs.append(model.logits(a))
        # next step: the state produced one position earlier
        g = torch.cat([torch.zeros_like(a[:, :1]), a[:, :-1]], dim=1)
    return outs
