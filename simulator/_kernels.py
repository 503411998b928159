r"""The simulator's per-step draw, compiled (numba): one pass over a decode step's requests.

Why compiled: at saturation every decode step draws ~64 requests' acceptance; as numpy over the batch that took
~20 array operations (30–50 µs) per step, the largest single cost of a replay. Used once numba is loaded in the
process (:meth:`~simulator.acceptance.ParametricAcceptance.sample_batch`; numba's import and the compiled code's load
from its cache cost ~0.7 s once; ``cache=True`` keeps the compiled code beside this file or in numba's user cache).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def draw_chains(k, alpha, base, u, ui, z, zi, decay, log_decay, want_kl):
    r"""Accepted counts (and KL) of a decode step's requests, in batch order (the math is
    :meth:`~simulator.acceptance.ParametricAcceptance.sample_batch`'s).

    Request ``r`` (depth ``k_r``, negative read as 0) reads the next ``k_r`` uniforms ``u[ui + o_r ..]`` and accepts
    the run of leading positions with ``u < p``, ``p`` the running product ``α_r, α_r·δ, …``; with ``want_kl`` its KL
    at position ``j`` is ``(base_r + j·log_decay) · z[zi + o_r + j]``. Returns ``(accepted, kl [B, max k], total)``:
    ``total`` uniforms (and noise values) read, or ``-total`` with nothing drawn when a buffer holds too few (the
    caller draws more and asks again).
    """
    B = k.shape[0]
    total = 0
    K = 0
    for r in range(B):
        if k[r] > 0:
            total += k[r]
            if k[r] > K:
                K = k[r]
    accepted = np.zeros(B, dtype=np.int64)
    kl = np.zeros((B, K if want_kl else 0))
    if ui + total > u.shape[0] or (want_kl and zi + total > z.shape[0]):
        return accepted, kl, -total
    off = 0
    for r in range(B):
        kr = k[r]
        if kr <= 0:
            continue
        n = 0
        p = alpha[r]
        while n < kr and u[ui + off + n] < p:  # the first miss (u >= p) ends the accepted run
            n += 1
            p *= decay
        accepted[r] = n
        if want_kl:
            for j in range(kr):
                kl[r, j] = (base[r] + j * log_decay) * z[zi + off + j]
        off += kr
    return accepted, kl, total
