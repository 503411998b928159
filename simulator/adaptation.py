r"""When does online adaptation pay? A replay with a trainer against the same replay without one.

Both runs share the trace, seed, policy and engine; they differ only in the trainer (``--trainer separate``: a
round of ``train_round_seconds`` on its own device, TIDE's heterogeneous mapping; ``shared``: slices of the
serving device). Requests are grouped by *arrival* into windows of ``window_s`` seconds; per window and run:

* acceptance length :math:`L = (\sum a_i + \sum s_i) / \sum s_i` (committed tokens per verify step: accepted
  drafts :math:`a_i` plus the bonus token of each of the :math:`s_i` speculative steps),
* mean TPOT and mean E2E latency of the window's requests.

The answer, ``pays_after_s``: the start of the first window from which the trained run's mean TPOT is below the
static run's in *every* later window (None: never). With a separate trainer the runs are identical until the
first round lands, so this is about when the first useful round takes effect; with a shared trainer the serving
device also pays for training, and early windows can be slower. ``speedup_second_half`` compares the static and
trained mean TPOT over the requests that arrive in the second half of the trace.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sglang_ext.formats.results import SimResult, latencies


def _windows(result: SimResult, edges: np.ndarray) -> list[dict[str, Any]]:
    req = result.requests
    lat = latencies(req)
    which = np.digitize(req["arrival"], edges[1:-1])  # window index per request
    rows = []
    for w in range(len(edges) - 1):
        m = which == w
        steps, acc = int(req["spec_steps"][m].sum()), int(req["accepted"][m].sum())
        rows.append({"requests": int(m.sum()),
                     "accept_length": (acc + steps) / steps if steps else None,
                     "tpot_s": float(lat["tpot"][m].mean()) if m.any() else None,
                     "e2e_s": float(lat["e2e"][m].mean()) if m.any() else None})
    return rows


def adaptation_pays(static: SimResult, trained: SimResult, window_s: float) -> dict[str, Any]:
    """The per-window comparison and ``pays_after_s`` (module docstring)."""
    if window_s <= 0:
        raise ValueError(f"window {window_s} s must be > 0")
    arr = static.requests["arrival"]
    if len(arr) == 0 or len(trained.requests["arrival"]) == 0:
        raise ValueError("no finished requests to compare")
    t0 = float(min(arr.min(), trained.requests["arrival"].min()))
    t1 = float(max(arr.max(), trained.requests["arrival"].max()))
    n = max(1, math.ceil((t1 - t0) / window_s + 1e-9))
    edges = t0 + window_s * np.arange(n + 1)
    edges[-1] = max(edges[-1], t1 + 1e-9)
    a, b = _windows(static, edges), _windows(trained, edges)
    windows = []
    for k, (x, y) in enumerate(zip(a, b)):
        ratio = x["tpot_s"] / y["tpot_s"] if x["tpot_s"] and y["tpot_s"] else None
        windows.append({"start_s": float(edges[k] - t0), "static": x, "trained": y, "tpot_speedup": ratio})
    pays = None
    for k in range(len(windows) - 1, -1, -1):  # the longest tail of windows where the trained run is faster
        r = windows[k]["tpot_speedup"]
        if r is None:
            continue
        if r > 1.0:
            pays = windows[k]["start_s"]
        else:
            break
    half = t0 + (t1 - t0) / 2

    def mean_tpot(res: SimResult) -> float:
        m = res.requests["arrival"] >= half
        return float(latencies(res.requests)["tpot"][m].mean()) if m.any() else math.nan

    st, tr = mean_tpot(static), mean_tpot(trained)
    return {"window_s": window_s, "pays_after_s": pays,
            "train_round_times_s": [t - t0 for t in trained.summary.get("train_round_times", [])],
            "speedup_second_half": st / tr if tr > 0 else None,
            "accept_length": {"static": static.summary.get("mean_acceptance_length"),
                              "trained": trained.summary.get("mean_acceptance_length")},
            "windows": windows}


__all__ = ["adaptation_pays"]
