r"""The simulator's per-step work over a decode step's requests, compiled (numba): the acceptance draw, the depth
clip and the commit of the running requests' counters, one pass each.

Why compiled: at saturation every decode step draws ~64 requests' acceptance; as numpy over the batch that took
~20 array operations (30–50 µs) per step, the largest single cost of a replay; the depth clip and the commit, as
Python over request objects, cost ~15 µs more per step. Used once numba is loaded in the process
(:meth:`~simulator.acceptance.ParametricAcceptance.sample_batch`, :class:`~simulator.model.Replica`'s running rows;
numba's import and the compiled code's load from its cache cost ~0.5 s once; ``cache=True`` keeps the compiled code
beside this file or in numba's user cache).
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


@njit(cache=True, nogil=True)
def clip_depths(lengths, uniform, cap, last, ctx):
    r"""Each running request's draft depth :math:`k_r = \max(0, \min(\text{len}_r, \text{cap}, \text{last}_r -
    \text{ctx}_r))` (:meth:`~simulator.model.Replica._depths`): ``len_r`` from ``lengths`` in batch order, or
    ``uniform`` for every request when ``lengths`` is empty; ``cap`` < 0: no cap. Returns ``(k, Σ k, max k)``."""
    n = ctx.shape[0]
    out = np.empty(n, dtype=np.int64)
    total = 0
    top = 0
    for i in range(n):
        k = uniform if lengths.shape[0] == 0 else lengths[i]
        if cap >= 0 and k > cap:
            k = cap
        left = last[i] - ctx[i]
        if k > left:
            k = left
        if k < 0:
            k = 0
        out[i] = k
        total += k
        if k > top:
            top = k
    return out, total, top


@njit(cache=True, nogil=True)
def commit_decode(ks, accepted, gen, out, spec, acc, pending, absorb):
    """A decode step's outcome on rows ``0..B-1`` of the running requests' counters
    (:meth:`~simulator.model.Replica._commit`): each commits ``a + 1`` tokens; a request that drafted counts a
    speculative step and its accepted tokens; with ``absorb`` its drafter's backlog grows by ``a + 1``. Returns the
    rows that reached their output length, in order, and the tokens committed."""
    B = ks.shape[0]
    done = np.empty(B, dtype=np.int64)
    n = 0
    tokens = 0
    for i in range(B):
        a = accepted[i]
        tokens += a + 1
        g = gen[i] + a + 1
        gen[i] = g
        if ks[i] > 0:
            spec[i] += 1
            acc[i] += a
        if absorb:
            pending[i] += a + 1
        if g >= out[i]:
            done[n] = i
            n += 1
    return done[:n], tokens


@njit(cache=True, nogil=True)
def drop_rows(drop, n, table):
    """Remove rows ``drop`` (ascending) from the first ``n`` rows of ``table`` (``[fields, rows]``), the others
    moving up in order. Returns the new row count."""
    j = 0
    d = 0
    for i in range(n):
        if d < drop.shape[0] and drop[d] == i:
            d += 1
            continue
        if j != i:
            for f in range(table.shape[0]):
                table[f, j] = table[f, i]
        j += 1
    return j
