r"""The policies' per-step work over a batch's requests, compiled (numba): one pass per step instead of tens of
numpy calls.

Why compiled: in a simulated run a policy steps ~64 requests per step for tens of thousands of steps; as numpy over
the batch, DSDE's controller still took ~40 array operations (~150 µs) per step and the per-request α update and the
capped expected totals ~20 each. Each function here is the formula of the docstring it names, written once, per
request, with the scalar formulas' float operations in their order (sums add one term at a time, as ``sum`` does),
so the results are those of the scalar definitions (tests compare decisions and bits).

Imported on first use (:func:`._estimators.kernels`): numba's import and the compiled code's load from its cache
cost ~0.5 s, paid only by a process whose policy steps through here. ``cache=True`` keeps the compiled code beside
this file (or in numba's user cache) for later processes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .dsde import _EPS_T as EPS_T
from .dsde import VAR_EPS, WVIR_FLAT


@njit(cache=True, nogil=True)
def _ring_weighted_variance(ring: np.ndarray, start: int, off: int, w: np.ndarray, sw: float) -> float:
    """Σ w (x − μ)² / Σ w with μ = Σ w x / Σ w over ``x = window[off:]`` of the window held in ``ring`` oldest
    first from ``ring[start]`` (``x_j = ring[(start + j) mod W]``), both sums in index order (newest value last,
    weight 1). The ring is read in place (an index that wraps), not copied into window order first."""
    W = ring.shape[0]
    first = start + off
    if first >= W:
        first -= W
    mu = 0.0
    idx = first
    for i in range(w.shape[0]):
        mu += w[i] * ring[idx]
        idx += 1
        if idx == W:
            idx = 0
    mu /= sw
    acc = 0.0
    idx = first
    for i in range(w.shape[0]):
        d = ring[idx] - mu
        acc += w[i] * (d * d)
        idx += 1
        if idx == W:
            idx = 0
    return acc / sw


@njit(cache=True, nogil=True)
def dsde_observe(slots, proposed, accepted, kl_len, kl, temps, state, ring, w, ws, consts, k_floor, max_k,
                 alpha_decay, batch_num, batch_den):
    """One verify step of DSDE's controller for requests ``i`` (state record ``state[slots[i]]``, KL window
    ``ring[slots[i]]``), in order (a request listed twice steps twice). Columns: ``proposed``/``accepted``/``kl_len``
    per request, ``kl`` ``[B, K]`` (``[B, 0]`` without KL), ``temps``; the records (:func:`.dsde._state_fields`) and
    the ring are updated in place. ``w``/``ws``:
    WVIR weights of the whole window and of its last third; ``consts``: their sums, ``max_factor``, ``min_frac``,
    ``sf_alpha``, ``miss_kl``. Requests that proposed nothing (no information about the drafter) are skipped.

    With ``alpha_decay`` > 0 each request's α record (``num``/``den``, DSDE's cost cap) steps too, exactly as
    :func:`ratio_update` (the same pass, so the step is one call): returns the batch-wide ``(S, N)`` it updated from
    ``(batch_num, batch_den)`` (returned unchanged without)."""
    sw, sws, max_factor, min_frac, sf_alpha, miss_kl = consts[0], consts[1], consts[2], consts[3], consts[4], consts[5]
    W = w.shape[0]
    short = ws.shape[0]
    K = kl.shape[1]
    vals = np.zeros(max(K, 1) + 1)
    for i in range(slots.shape[0]):
        prop, acc = proposed[i], accepted[i]
        if prop <= 0:
            continue
        st = state[slots[i]]
        if alpha_decay > 0:
            s, t = _ratio_step(st, prop, acc, alpha_decay)
            batch_num = alpha_decay * batch_num + s
            batch_den = alpha_decay * batch_den + t
        window = ring[slots[i]]
        # this step's values: the drafter's KL at the proposed positions, or the acceptance-only proxy
        proxy = kl_len[i] <= 0
        if proxy:
            count = acc + (1 if acc < prop else 0)
        else:
            count = min(kl_len[i], prop)
        if count > vals.shape[0]:
            vals = np.zeros(count)
        for j in range(count):
            if proxy:
                vals[j] = miss_kl if j == acc else 0.0
            else:
                vals[j] = kl[i, j] if j < K else 0.0
        # the KL window ring (only the last W values are kept)
        ptr = st.kl_ptr
        for j in range(max(0, count - W), count):
            window[(ptr + j) % W] = vals[j]
        st.kl_ptr = (ptr + count) % W
        st.kl_n = min(st.kl_n + count, W)
        if not st.steady:
            if st.kl_n < W:  # warm-up: collect samples, double k while everything is accepted
                st.warm_n += 1
                if acc > st.warm_acc_max:
                    st.warm_acc_max = acc
                total = st.warm_kl_sum
                top = -np.inf
                for j in range(count):
                    total += vals[j]
                    if vals[j] > top:
                        top = vals[j]
                st.warm_kl_sum = total
                st.warm_kl_max = max(st.warm_kl_max, top) if st.warm_kl_n > 0 else top
                st.warm_kl_n += count
                k = st.k
                if acc >= k:
                    k = min(2 * k if k > 0 else 1, max_k)
                else:
                    k = max(k, k_floor)
                st.k = k
                st.pred = min(max(k, k_floor), max_k)
                continue
            # end of warm-up: the bounds, once; steady from this step on
            if st.warm_n == 0:
                st.lo, st.hi = k_floor, max_k
            else:
                n = st.warm_kl_n
                mean_kl = st.warm_kl_sum / max(n, 1) if n > 0 else 0.0
                max_kl = st.warm_kl_max if n > 0 else 1.0
                if max_kl == 0:
                    max_kl = 1.0
                hi = int(min(max_k, max(k_floor, np.rint(st.warm_acc_max * (1 + max_factor * mean_kl / max_kl)))))
                st.hi = hi
                st.lo = int(min(hi, max(k_floor, math.ceil(min_frac * hi))))
            st.steady = True
        # steady: SF from this step's mean KL, WVIR over the window (oldest first), DSDE's length rule
        total = 0.0
        for j in range(count):
            total += vals[j]
        kl_last = total / count
        t = temps[i]
        xs = kl_last / (t + EPS_T) if (not proxy and abs(t) >= EPS_T) else kl_last
        sf = math.expm1(min(sf_alpha * xs, 700.0))
        long_var = _ring_weighted_variance(window, st.kl_ptr, 0, w, sw)
        if long_var < VAR_EPS:
            ratio = WVIR_FLAT
        else:
            ratio = _ring_weighted_variance(window, st.kl_ptr, W - short, ws, sws) / long_var
        lo, hi = st.lo, st.hi
        r = ratio * sf
        if r <= 1:
            k = max(lo, int(math.ceil((hi - lo) * (1 - r) + lo)))
        else:
            k = lo
        st.k = k
        st.pred = min(max(k, k_floor), max_k)
    return batch_num, batch_den


@njit(cache=True, nogil=True)
def dsde_lengths(slots, state, cap):
    """DSDE's lengths before the cost cap: each request's prediction ``pred``, and with ``cap`` the SL cap
    ``ceil(mean of the steady requests' pred)`` applied to the steady ones (requests in warm-up are neither capped
    nor counted). Returns ``(lengths, SL cap or -1 when none applies)``."""
    n = slots.shape[0]
    lengths = np.empty(n, dtype=np.int64)
    total = 0
    count = 0
    for i in range(n):
        st = state[slots[i]]
        lengths[i] = st.pred
        if st.steady:
            total += st.pred
            count += 1
    if not cap or count == 0:
        return lengths, -1
    sl_cap = int(math.ceil(total / count - 1e-12))
    for i in range(n):
        if state[slots[i]].steady and lengths[i] > sl_cap:
            lengths[i] = sl_cap
    return lengths, sl_cap


@njit(cache=True, nogil=True)
def _ratio_step(st, proposed, accepted, decay):
    r"""One request's chain trials ``s = a``, ``n = a + [a < k]`` (:func:`~sglang_ext.core.signals.chain_trials`)
    into its record: :math:`S_r \leftarrow \lambda S_r + s,\ N_r \leftarrow \lambda N_r + n` (``num``/``den``).
    Returns ``(s, n)``."""
    s = accepted
    t = s + (1 if s < proposed else 0)
    st.num = decay * st.num + s
    st.den = decay * st.den + t
    return s, t


@njit(cache=True, nogil=True)
def ratio_update(slots, proposed, accepted, state, decay, batch_num, batch_den):
    r""":class:`~._estimators.RequestAlphas`' update from the requests that proposed (``proposed > 0``; the others
    are skipped), request by request in batch order (a request listed twice updates twice): :func:`_ratio_step` on
    each record, and the batch-wide ratio the same way over every request in turn. Returns the batch-wide
    ``(S, N)``."""
    for i in range(slots.shape[0]):
        if proposed[i] <= 0:  # no chain trials
            continue
        s, t = _ratio_step(state[slots[i]], proposed[i], accepted[i], decay)
        batch_num = decay * batch_num + s
        batch_den = decay * batch_den + t
    return batch_num, batch_den


@njit(cache=True, nogil=True)
def chain_trial_sums(proposed, accepted):
    """Σ successes and Σ trials of :func:`~sglang_ext.core.signals.chain_trials` over a step's requests that
    proposed: ``s = a``, ``n = a + [a < k]``."""
    s = 0
    t = 0
    for i in range(proposed.shape[0]):
        if proposed[i] > 0:
            s += accepted[i]
            t += accepted[i] + (1 if accepted[i] < proposed[i] else 0)
    return s, t


@njit(cache=True, nogil=True)
def ratio_values(slots, state, fallback):
    """``num / den`` of each record at ``slots``, ``fallback`` where the slot is -1 (no record) or ``den`` is 0 (a
    record without trials yet)."""
    out = np.empty(slots.shape[0])
    for i in range(slots.shape[0]):
        out[i] = state[slots[i]].num / state[slots[i]].den if slots[i] >= 0 and state[slots[i]].den > 0 else fallback
    return out


@njit(cache=True, nogil=True)
def capped_totals(alphas, lengths, top):
    r"""``E_total(c) = Σ_r Σ_{i=0}^{min(k_r, c)} α_r^i`` for ``c = 0..top`` (``lengths`` empty: every ``k_r = top``),
    α clipped to [0, 1]: per request the powers as a running product (``1, α, α·α, …``) and the partial sums as a
    running sum, the totals adding the requests in batch order (:func:`~.goodput.capped_expected_totals`)."""
    out = np.zeros(top + 1)
    capped = lengths.shape[0] > 0
    for r in range(alphas.shape[0]):
        a = min(max(alphas[r], 0.0), 1.0)
        k = lengths[r] if capped else top
        p = 1.0
        run = 0.0
        for c in range(top + 1):
            if c <= k:
                run += p
            out[c] += run
            p *= a
    return out


@njit(cache=True, nogil=True)
def _ratio_or(st, fallback):
    """α of one :class:`~._estimators.RequestAlphas` record: ``num / den``, ``fallback`` before its first trial."""
    return st.num / st.den if st.den > 0 else fallback


@njit(cache=True, nogil=True)
def _best_cap(totals, lo, hi, base, per_ctx, draft, parts_lo, ctx, skip_unpriced):
    r"""``argmax_{c = lo..hi} totals[c] / S(c)`` with ``S(c) = (base + per_ctx · ctx) + draft`` at row
    ``c - parts_lo`` (:meth:`~sglang_ext.core.costs.CostModel.depth_parts`); ties keep the smaller ``c``.
    A depth whose price is not positive (the cost model cannot answer) is left out with ``skip_unpriced``, else it
    ends the search. Returns ``(c, G)``, or ``(-1, 0)`` without an answer."""
    best_c = -1
    best_g = 0.0
    for c in range(lo, hi + 1):
        j = c - parts_lo
        s = base[j] + per_ctx[j] * ctx + draft[j]
        if s <= 0:
            if skip_unpriced:
                continue
            return -1, 0.0
        g = totals[c] / s
        if best_c < 0 or g > best_g:
            best_c = c
            best_g = g
    return best_c, best_g


@njit(cache=True, nogil=True)
def dsde_decide(slots, state, cap, floor, fallback, base, per_ctx, draft, parts_lo, ctx):
    """DSDE's whole decision with the cost cap priced by a profile: :func:`dsde_lengths`, then
    :func:`~.goodput.best_length_cap` over ``floor..max(lengths)`` with each request's α from its record
    (:func:`_ratio_or`) and the capped totals of :func:`capped_totals`, and the lengths capped. Returns
    ``(lengths, SL cap or -1, cost cap or -1, the longest length)``."""
    lengths, sl_cap = dsde_lengths(slots, state, cap)
    n = slots.shape[0]
    if n == 0:
        return lengths, sl_cap, -1, 0
    top = lengths.max()
    if top <= floor:
        return lengths, sl_cap, -1, top
    alphas = np.empty(n)
    for i in range(n):
        alphas[i] = _ratio_or(state[slots[i]], fallback)
    totals = capped_totals(alphas, lengths, top)
    best, _ = _best_cap(totals, max(floor, 0), top, base, per_ctx, draft, parts_lo, ctx, False)
    if best >= 0:
        for i in range(n):
            if lengths[i] > best:
                lengths[i] = best
        top = min(top, best)
    return lengths, sl_cap, best, top


@njit(cache=True, nogil=True)
def goodput_best(slots, state, fallback, lo, hi, base, per_ctx, draft, parts_lo, ctx):
    """The goodput policy's argmax over one depth for the whole batch, ``lo..hi``, priced by a profile: α per
    request from its record (``slots[i] = -1``: ``fallback``), :func:`capped_totals` uncapped, :func:`_best_cap`.
    Returns ``(depth or -1, its goodput)``."""
    n = slots.shape[0]
    alphas = np.empty(n)
    for i in range(n):
        alphas[i] = _ratio_or(state[slots[i]], fallback) if slots[i] >= 0 else fallback
    totals = capped_totals(alphas, np.zeros(0, dtype=np.int64), hi)
    return _best_cap(totals, lo, hi, base, per_ctx, draft, parts_lo, ctx, True)
