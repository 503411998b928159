r"""Step costs fitted to a measured profile: what a verify forward, a draft and a trainer step cost.

A **profile** (``sglang-ext profile``, or written by hand from published tables; format in
``traces/profiles/README.md``) lists measured seconds per configuration. :meth:`CostModel.fit` turns it into
four small formulas that the simulator and the cost-aware policies evaluate in about a microsecond:

**Verify** (one target forward over ``B`` requests of ``t`` new nodes each, ``c`` committed context tokens
per request; batched tokens ``n = B t``):

.. math::

    T_{verify}(B, t, c) = a + s_1 \min(n, \beta) + s_2 \max(n - \beta, 0) + J\,[n > \beta_J]
                          + r\,B + k\,B c + q\,n c

* ``a`` (``const``): fixed cost per forward (kernel launches, Python, reading the weights once);
* ``s_1, s_2`` (``per_token``, ``per_token_above``): cost per batched token below / above the hinge ``β``
  (GEMM regime change: a GPU is memory-bound, nearly flat, until ``n`` reaches its compute roofline);
* ``J`` (``jump``): a step past ``β_J`` (a CPU's GEMM library switches kernels: on the 2-core Xeon the forward
  jumps by ~11 ms from 3 to 4 batched tokens);
* ``r`` (``per_request``): per-request cost (masks, KV writes, per-row bookkeeping);
* ``k`` (``per_kv_token``): KV read per context token (each request's cache is read once per forward);
* ``q`` (``per_attention_pair``): attention compute per (query, key) pair.

**Draft** (one chain draft of ``d`` tokens for ``B`` requests: absorb the committed pairs, then ``d`` draft steps):

.. math::

    T_{draft}(B, d) = (o + o_B B) + d\,\bigl(u + u_1 \min(B, \beta) + u_2 \max(B - \beta, 0) + J_d\,[B > \beta_J]\bigr),
    \qquad T_{draft}(B, 0) = 0

(a profile whose draft entries all have one depth cannot separate the call overhead from the per-step cost:
then ``o = o_B = 0`` and the entries are read as per-step times).

**Prefill** (one chunk of ``P`` prompt tokens for one request after ``c`` committed ones; the same hinge and jump
on ``P``, plus the prefix read and the causal attention pairs):
:math:`T_{prefill}(P, c) = a + s_1 \min(P, \beta) + s_2 \max(P - \beta, 0) + J [P > \beta_J] + k c + q (P c + P(P+1)/2)`;
without prefill entries, :meth:`CostModel.prefill_seconds` falls back to ``T_verify(1, P, c)``.

**Train** (one optimiser step of the drafter on ``N`` tokens):
:math:`T_{train}(N) = e + g_1 \min(N, \beta) + g_2 \max(N - \beta, 0) + J\,[N > \beta_J]`.

**Knots** (structure ``knots``, any formula): the part that depends on the hinge variable alone (``a + s_1 min +
s_2 max + J``; draft: the per-step cost) is replaced by a free piecewise-linear curve ``g`` through every measured
value ``k_i`` of that variable: :math:`g(x) = g_i + (g_{i+1} - g_i)(x - k_i)/(k_{i+1} - k_i)` (see
:func:`knot_curve` for the ends). It follows what a hinge cannot: a CPU GEMM library that runs 2-3 batched tokens
*slower* than 4 (a 2-core EPYC: 100-150 ms vs 91-110 ms), or a jump back at 12 (a 2-core Xeon).

Every coefficient is **non-negative**, so with the four hinge/jump structures every cost is non-decreasing in
each of its arguments (in ``n`` in particular, wherever the hinge and the jump sit); ``knots`` keeps only
``g >= 0``, so it is the one structure that can price a larger batch below a smaller one, where the machine does.

Fitting: for fixed ``β, β_J`` the model is linear in its coefficients, so they come from non-negative least
squares on the **relative** error,

.. math:: \min_{\theta \ge 0} \sum_i \Bigl(\frac{X_i \theta - y_i}{y_i}\Bigr)^2;

``β_J`` is searched over the midpoints between measured values (the data cannot place a step more precisely),
``β`` over the measured values and midpoints and then refined by a bounded scalar minimisation. The structure,
``linear`` / ``jump`` / ``hinge`` / ``hinge+jump`` / ``knots``, is chosen by BIC on the relative residuals
(``m ln(RSS/m) + p ln m``, ``p`` = non-zero coefficients, each knot's value among them, plus one per
breakpoint) and needs two points per parameter, so a breakpoint is kept only where the data pay for it.
:meth:`CostModel.fit_report` gives the mean and max relative error on the profile points and the fitted formulas.
Pure numpy/scipy: no torch import.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: pending pairs above which the EAGLE drafter absorbs a request's backlog alone, unpadded, before the batched
#: absorb (:mod:`sglang_ext.core.drafters.eagle`); the simulator prices catch-ups by the same rule. Kept here, in a
#: module without torch, so that the simulator reads it without importing the drafter.
CATCH_UP_SPLIT = 16

PROFILE_FORMAT = "sglang-ext-profile/1"
MODEL_FORMAT = "sglang-ext-costmodel/1"
STRUCTURES = ("linear", "jump", "hinge", "hinge+jump", "knots")


class ProfileError(ValueError):
    """A malformed profile or cost-model file; the message names the file and the JSON path of the entry."""


# ---- profile validation ----------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_ENTRY_FIELDS: dict[str, tuple[tuple[str, str, bool, int | None], ...]] = {
    # section: (field, kind, required, default)
    "target": (("batch_size", "int>=1", True, None), ("tokens_per_request", "int>=1", True, None),
               ("context_len", "int>=0", False, 0), ("seconds", "seconds", True, None)),
    "prefill": (("tokens", "int>=1", True, None), ("context_len", "int>=0", False, 0), ("seconds", "seconds", True, None)),
    "draft": (("batch_size", "int>=1", True, None), ("depth", "int>=1", False, 1), ("seconds", "seconds", True, None)),
    "train": (("tokens", "int>=1", True, None), ("seconds", "seconds", True, None)),
}


def validate_profile(data: Any, source: str = "<profile>") -> dict:
    """Check a profile dict and return a normalised copy (defaults filled in); raises :class:`ProfileError`.

    Required: ``format`` = ``sglang-ext-profile/1``; ``meta`` an object with ``model`` (string) and ``hardware``
    (string or object). ``target``, ``prefill``, ``draft`` and ``train`` are optional lists (a profile may measure some parts
    only; :meth:`CostModel.fit` needs ``target``). Entry fields are listed in ``_ENTRY_FIELDS``; unknown fields are
    kept and ignored.
    """
    def fail(where: str, msg: str) -> ProfileError:
        return ProfileError(f"{source}: {where} {msg}")

    if not isinstance(data, dict):
        raise fail("top level", f"must be a JSON object, got {type(data).__name__}")
    if data.get("format") != PROFILE_FORMAT:
        raise fail("format", f"must be {PROFILE_FORMAT!r}, got {data.get('format')!r}")
    meta = data.get("meta")
    if not isinstance(meta, dict):
        raise fail("meta", "must be an object (with at least model and hardware)")
    if not isinstance(meta.get("model"), str) or not meta["model"]:
        raise fail("meta.model", "must be a non-empty string (the model profiled)")
    if not isinstance(meta.get("hardware"), (str, dict)) or not meta["hardware"]:
        raise fail("meta.hardware", "must be a string or an object describing the machine")
    out: dict[str, Any] = {"format": PROFILE_FORMAT, "meta": dict(meta)}
    for section, fields in _ENTRY_FIELDS.items():
        entries = data.get(section, [])
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            raise fail(section, f"must be a list, got {type(entries).__name__}")
        rows = []
        for i, e in enumerate(entries):
            where = f"{section}[{i}]"
            if not isinstance(e, dict):
                raise fail(where, f"must be an object, got {type(e).__name__}")
            row = dict(e)
            for name, kind, required, default in fields:
                if name not in e:
                    if required:
                        raise fail(f"{where}.{name}", "is missing")
                    row[name] = default
                    continue
                v = e[name]
                if kind == "seconds":
                    if not _is_num(v) or v <= 0:
                        raise fail(f"{where}.{name}", f"must be > 0 (a finite number of seconds), got {v!r}")
                    row[name] = float(v)
                else:
                    low = int(kind[-1])
                    if not _is_int(v) or v < low:
                        raise fail(f"{where}.{name}", f"must be an integer >= {low}, got {v!r}")
            rows.append(row)
        out[section] = rows
    return out


def load_profile(path: str | Path) -> dict:
    """Read and validate a profile JSON file; errors name the file and the entry (``p.json: target[3].seconds ...``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ProfileError(f"{p}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ProfileError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); a profile is JSON") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{p}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from e
    return validate_profile(data, str(p))


# ---- the four formulas -----------------------------------------------------------------------------------------
Columns = Callable[[Mapping[str, np.ndarray], float, "float | None"], dict]


@dataclass(frozen=True)
class Terms:
    """One cost formula: its inputs, the variable its hinge and jump act on, and its feature columns.

    ``columns(values, beta, jump_at)``: ``beta`` is the hinge (``inf``: none), ``jump_at`` the step (``None``: none).
    """

    name: str
    inputs: tuple[str, ...]
    hinge_var: str
    columns: Columns
    formula: str
    #: the coefficients of the part that depends on ``hinge_var`` alone: constant, slope below / above the hinge,
    #: jump. Structure ``knots`` replaces them by a free piecewise-linear curve through every measured value.
    curve: tuple[str, str, str, str] = ("const", "per_token", "per_token_above", "jump")
    #: the input that multiplies that curve (draft: ``depth``, the curve being one draft step), or ``None``
    curve_weight: str | None = None
    #: ``knots``: the curve's value at knot ``k`` is the coefficient ``curve_prefix + f"{k:g}"`` (``at_n=4``)
    curve_prefix: str = "at_n="


def _hinge(x: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    return np.minimum(x, beta), np.maximum(x - beta, 0.0)


def _verify_columns(v: Mapping[str, np.ndarray], beta: float, jump_at: float | None) -> dict[str, np.ndarray]:
    B, t, c = v["batch_size"], v["tokens_per_request"], v["context_len"]
    n = B * t
    below, above = _hinge(n, beta)
    cols = {"const": np.ones_like(n), "per_token": below, "per_token_above": above}
    if jump_at is not None:
        cols["jump"] = (n > jump_at).astype(float)
    cols.update(per_request=B, per_kv_token=B * c, per_attention_pair=n * c)
    return cols


def _prefill_columns(v: Mapping[str, np.ndarray], beta: float, jump_at: float | None) -> dict[str, np.ndarray]:
    P, c = v["tokens"], v["context_len"]
    below, above = _hinge(P, beta)
    cols = {"const": np.ones_like(P), "per_token": below, "per_token_above": above}
    if jump_at is not None:
        cols["jump"] = (P > jump_at).astype(float)
    # token i of the chunk attends to the c cached positions and to i + 1 chunk positions
    cols.update(per_kv_token=c, per_attention_pair=P * c + P * (P + 1) / 2)
    return cols


def _draft_columns(v: Mapping[str, np.ndarray], beta: float, jump_at: float | None) -> dict[str, np.ndarray]:
    B, d = v["batch_size"], v["depth"]
    below, above = _hinge(B, beta)
    cols = {"call": np.ones_like(B), "call_per_request": B, "step": d, "step_per_request": d * below,
            "step_per_request_above": d * above}
    if jump_at is not None:
        cols["step_jump"] = d * (B > jump_at).astype(float)
    return cols


def _train_columns(v: Mapping[str, np.ndarray], beta: float, jump_at: float | None) -> dict[str, np.ndarray]:
    N = v["tokens"]
    below, above = _hinge(N, beta)
    cols = {"const": np.ones_like(N), "per_token": below, "per_token_above": above}
    if jump_at is not None:
        cols["jump"] = (N > jump_at).astype(float)
    return cols


VERIFY = Terms("verify", ("batch_size", "tokens_per_request", "context_len"), "n", _verify_columns,
               "const + per_token*min(n,beta) + per_token_above*max(n-beta,0) + jump*[n>jump_at] + per_request*B"
               " + per_kv_token*B*c + per_attention_pair*n*c  (n = B*t, c = context_len)")
PREFILL = Terms("prefill", ("tokens", "context_len"), "tokens", _prefill_columns,
                "const + per_token*min(P,beta) + per_token_above*max(P-beta,0) + jump*[P>jump_at] + per_kv_token*c"
                " + per_attention_pair*(P*c + P*(P+1)/2)  (P = chunk tokens, c = context_len)", curve_prefix="at_P=")
DRAFT = Terms("draft", ("batch_size", "depth"), "batch_size", _draft_columns,
              "call + call_per_request*B + d*(step + step_per_request*min(B,beta) + step_per_request_above*max(B-beta,0)"
              " + step_jump*[B>jump_at])", curve=("step", "step_per_request", "step_per_request_above", "step_jump"),
              curve_weight="depth", curve_prefix="step_at_B=")
TRAIN = Terms("train", ("tokens",), "tokens", _train_columns,
              "const + per_token*min(N,beta) + per_token_above*max(N-beta,0) + jump*[N>jump_at]", curve_prefix="at_N=")
_TERMS = {"verify": VERIFY, "prefill": PREFILL, "draft": DRAFT, "train": TRAIN}
_HAS_HINGE = {"linear": False, "jump": False, "hinge": True, "hinge+jump": True, "knots": False}
_HAS_JUMP = {"linear": False, "jump": True, "hinge": False, "hinge+jump": True, "knots": False}


def _knot_name(terms: Terms, knot: float) -> str:
    """The coefficient holding the curve's value at ``knot`` (``at_n=4``; draft: ``step_at_B=4``)."""
    return f"{terms.curve_prefix}{knot:g}"


def _hats(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Columns ``h_i(x)``: the piecewise-linear interpolation weights of the knots, so ``Σ_i g_i h_i(x)`` is the
    curve through ``(k_i, g_i)``. Used to fit (every fitted point lies within the knots)."""
    eye = np.eye(len(knots))
    return np.column_stack([np.interp(x, knots, eye[i]) for i in range(len(knots))])


def knot_curve(knots: Sequence[float], values: Sequence[float], x: float) -> float:
    r"""The fitted curve at ``x``: linear between knots; flat below the first; past the last, the last segment's
    slope when it rises (the trend of the largest measured sizes), flat when it falls (never below a measured value).

    .. math:: g(x) = g_i + (g_{i+1} - g_i) \frac{x - k_i}{k_{i+1} - k_i}, \quad k_i \le x \le k_{i+1}
    """
    if x <= knots[0]:
        return values[0]
    i = bisect.bisect_left(knots, x)
    if i < len(knots):
        k0, k1 = knots[i - 1], knots[i]
        return values[i - 1] + (values[i] - values[i - 1]) * (x - k0) / (k1 - k0)
    slope = (values[-1] - values[-2]) / (knots[-1] - knots[-2]) if len(knots) > 1 else 0.0
    return values[-1] + max(slope, 0.0) * (x - knots[-1])


@dataclass
class FittedTerm:
    """A fitted formula: structure, hinge ``breakpoint`` and step ``jump_at`` (``None``: absent), coefficients.

    Structure ``knots``: ``knots`` lists the measured values of the hinge variable, and the coefficients
    ``at_n=<k>`` (draft: ``step_at_B=<k>``) the curve's value there; they replace the constant, slopes and jump.
    """

    terms: Terms
    structure: str
    breakpoint: float | None
    coefficients: dict[str, float]
    jump_at: float | None = None
    points: int = 0
    mean_rel_error: float = 0.0
    max_rel_error: float = 0.0
    dropped: tuple[str, ...] = ()
    knots: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self._knot_values = None if self.knots is None else \
            [self.coefficients.get(_knot_name(self.terms, k), 0.0) for k in self.knots]
        self._memo: dict[float, float] = {}

    def curve_at(self, x: float) -> float:
        """The part of the formula that depends on the hinge variable alone (scalar; memoised per ``x``).

        Why memoised: a policy pricing every depth of every step asks for the same few hundred ``x`` (batched
        tokens, batch sizes) millions of times in a simulated run; the answer is a pure function of ``x``.
        """
        got = self._memo.get(x)
        if got is None:
            if len(self._memo) >= 1 << 16:  # prefill sizes are unbounded: keep the memo bounded
                self._memo.clear()
            got = self._memo[x] = self._curve_at(x)
        return got

    def _curve_at(self, x: float) -> float:
        if self._knot_values is not None:
            return knot_curve(self.knots, self._knot_values, x)
        c0, s1, s2, jump = self.terms.curve
        c = self.coefficients
        beta = math.inf if self.breakpoint is None else self.breakpoint
        s = c.get(c0, 0.0) + c.get(s1, 0.0) * min(x, beta)
        if x > beta:
            s += c.get(s2, 0.0) * (x - beta)
        if self.jump_at is not None and x > self.jump_at:
            s += c.get(jump, 0.0)
        return s

    def predict(self, values: Mapping[str, Any]) -> np.ndarray:
        """Vectorised evaluation (numpy arrays of the formula's inputs)."""
        v = {k: np.asarray(values[k], dtype=float) for k in self.terms.inputs}
        beta = math.inf if self.breakpoint is None else self.breakpoint
        cols = self.terms.columns(v, beta, self.jump_at)
        if self.knots is None:
            return sum(self.coefficients.get(name, 0.0) * col for name, col in cols.items())
        base = sum(self.coefficients.get(name, 0.0) * col for name, col in cols.items() if name not in self.terms.curve)
        x = np.broadcast_to(_hinge_values(self.terms, v), np.broadcast(*v.values()).shape)
        curve = np.array([self.curve_at(float(xi)) for xi in x.ravel()]).reshape(x.shape)
        weight = v[self.terms.curve_weight] if self.terms.curve_weight else 1.0
        return base + weight * curve

    def to_dict(self) -> dict:
        out = {"formula": self.terms.formula, "structure": self.structure, "breakpoint": self.breakpoint,
               "jump_at": self.jump_at, "coefficients": self.coefficients, "points": self.points,
               "mean_rel_error": self.mean_rel_error, "max_rel_error": self.max_rel_error, "dropped": list(self.dropped)}
        if self.knots is not None:
            out["knots"] = list(self.knots)
        return out

    @staticmethod
    def from_dict(terms: Terms, d: Mapping[str, Any], where: str) -> FittedTerm:
        if d.get("structure") not in STRUCTURES:
            raise ProfileError(f"{where}.structure must be one of {STRUCTURES}, got {d.get('structure')!r}")
        for key in ("breakpoint", "jump_at"):
            if d.get(key) is not None and not _is_num(d[key]):
                raise ProfileError(f"{where}.{key} must be a number or null, got {d[key]!r}")
        coefs = d.get("coefficients")
        if not isinstance(coefs, dict):
            raise ProfileError(f"{where}.coefficients must be an object")
        for k, v in coefs.items():
            if not _is_num(v) or v < 0:
                raise ProfileError(f"{where}.coefficients.{k} must be a finite number >= 0, got {v!r}")
        knots = d.get("knots")
        if d["structure"] == "knots":
            if not (isinstance(knots, list) and knots and all(_is_num(k) for k in knots)
                    and all(a < b for a, b in zip(knots, knots[1:]))):
                raise ProfileError(f"{where}.knots must be a non-empty increasing list of numbers, got {knots!r}")
            missing = [_knot_name(terms, k) for k in knots if _knot_name(terms, k) not in coefs]
            if missing:
                raise ProfileError(f"{where}.coefficients: missing the curve's value at {missing[0]}")
        bp, ja = d.get("breakpoint"), d.get("jump_at")
        return FittedTerm(terms, d["structure"], None if bp is None else float(bp), {k: float(v) for k, v in coefs.items()},
                          None if ja is None else float(ja), int(d.get("points", 0)), float(d.get("mean_rel_error", 0.0)),
                          float(d.get("max_rel_error", 0.0)), tuple(d.get("dropped", ())),
                          tuple(float(k) for k in knots) if d["structure"] == "knots" else None)


# ---- fitting ---------------------------------------------------------------------------------------------------
def _nnls_relative(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """``argmin_{θ>=0} Σ ((Xθ - y)/y)²`` and its residual sum of squares."""
    from scipy.optimize import nnls

    A = X / y[:, None]
    scale = np.linalg.norm(A, axis=0)
    scale[scale == 0] = 1.0
    theta, _ = nnls(A / scale, np.ones(len(y)), maxiter=50 * X.shape[1] + 100)
    theta = theta / scale
    r = A @ theta - 1.0
    return theta, float(r @ r)


def _design(terms: Terms, v: Mapping[str, np.ndarray], beta: float, jump_at: float | None, drop: Sequence[str]):
    cols = {k: c for k, c in terms.columns(v, beta, jump_at).items() if k not in drop}
    if not math.isfinite(beta):  # no hinge: the "above" columns are identically zero
        cols = {k: c for k, c in cols.items() if not k.endswith("_above")}
    names = list(cols)
    shape = v[terms.inputs[0]].shape
    X = np.column_stack([np.broadcast_to(np.asarray(cols[k], dtype=float), shape) for k in names])
    return X, names


#: relative residuals below 1e-4 per point count as exact (so exact fits tie and the simplest one wins)
_RSS_FLOOR = 1e-8


def _bic(rss: float, m: int, p: int) -> float:
    return m * math.log(max(rss / m, _RSS_FLOOR)) + p * math.log(max(m, 2))


def _hinge_values(terms: Terms, v: Mapping[str, np.ndarray]) -> np.ndarray:
    if terms.hinge_var == "n":
        return v["batch_size"] * v["tokens_per_request"]
    return v[terms.hinge_var]


_NONE = (math.inf, math.inf, None, np.zeros(0), [])


def _fit_structure(terms: Terms, v: Mapping[str, np.ndarray], y: np.ndarray, structure: str, drop: Sequence[str]):
    """Best ``(bic, beta, jump_at, theta, names)`` of one structure (``bic`` inf: not enough data for it).

    The jump sits at a midpoint between measured values (the data cannot place it more precisely); the hinge is
    searched over the measured values and midpoints, then refined by a bounded scalar minimisation.
    """
    from scipy.optimize import minimize_scalar

    m = len(y)
    hinge, jump = _HAS_HINGE[structure], _HAS_JUMP[structure]
    h = np.unique(_hinge_values(terms, v))
    if hinge or jump:
        X, _ = _design(terms, v, 1.0 if hinge else math.inf, 0.0 if jump else None, drop)
        if m < 2 * (X.shape[1] + hinge + jump) or len(h) < 3:  # two points per parameter, breakpoints included
            return _NONE
    mids = (h[:-1] + h[1:]) / 2
    jump_cands = list(mids) if jump else [None]
    hinge_cands = np.unique(np.concatenate([h[1:-1], mids])) if hinge else np.array([math.inf])

    def rss_at(beta: float, jump_at: float | None) -> float:
        return _nnls_relative(_design(terms, v, beta, jump_at, drop)[0], y)[1]

    best = None
    for ja in jump_cands:
        for b in hinge_cands:
            r = rss_at(float(b), ja)
            if best is None or r < best[0]:
                best = (r, float(b), ja)
    rss, beta, jump_at = best
    if hinge:  # refine the hinge between its neighbouring candidates
        i = int(np.searchsorted(hinge_cands, beta))
        lo, hi = float(hinge_cands[max(i - 1, 0)]), float(hinge_cands[min(i + 1, len(hinge_cands) - 1)])
        if hi > lo:
            res = minimize_scalar(lambda b: rss_at(b, jump_at), bounds=(lo, hi), method="bounded",
                                  options={"xatol": 1e-3 * (hi - lo)})
            if res.fun < rss:
                beta = float(res.x)
    X, names = _design(terms, v, beta, jump_at, drop)
    theta, rss = _nnls_relative(X, y)
    p = int(np.count_nonzero(theta)) + hinge + jump
    return _bic(rss, m, p), beta, jump_at, theta, names


def _fit_knots(terms: Terms, v: Mapping[str, np.ndarray], y: np.ndarray, drop: Sequence[str]):
    """Structure ``knots``: ``(bic, knots, theta, names)``; the curve's value at every measured value of the hinge
    variable is a free (non-negative) coefficient, fitted with the other terms by the same relative NNLS.

    For a machine whose cost is not monotone in the batch: a CPU GEMM library that is slower at 2-3 rows than
    at 4 (measured on a 2-core EPYC: 100-150 ms at 2-3 batched tokens, 91-110 ms at 4) — a shape no hinge or step
    of non-negative slopes can follow. BIC charges every knot, so it is chosen only where the data pay for it.
    """
    m = len(y)
    x = _hinge_values(terms, v)
    knots = np.unique(x)
    base = {k: np.broadcast_to(np.asarray(c, dtype=float), x.shape)
            for k, c in terms.columns(v, math.inf, None).items()
            if k not in terms.curve and k not in drop}
    weight = v[terms.curve_weight] if terms.curve_weight else 1.0
    hats = _hats(x, knots) * np.reshape(weight, (-1, 1))
    names = list(base) + [_knot_name(terms, float(k)) for k in knots]
    X = np.column_stack([*base.values(), hats]) if base else hats
    if len(knots) < 3 or m < 2 * X.shape[1]:
        return math.inf, None, np.zeros(0), []
    theta, rss = _nnls_relative(X, y)
    return _bic(rss, m, int(np.count_nonzero(theta))), tuple(float(k) for k in knots), theta, names


def fit_term(terms: Terms, rows: Sequence[Mapping[str, Any]], structures: Iterable[str] = STRUCTURES,
             drop: Sequence[str] = (), statistic: str = "seconds") -> FittedTerm:
    """Fit one formula to profile rows (each has the formula's inputs and ``statistic``); structure chosen by BIC.

    A structure with a hinge, a jump or knots is only tried with at least two points per parameter; ``linear``
    always is.
    """
    if not rows:
        raise ValueError(f"{terms.name}: no profile entries to fit")
    v = {k: np.array([float(r[k]) for r in rows]) for k in terms.inputs}
    y = np.array([float(r.get(statistic, r["seconds"])) for r in rows])
    best = None
    for s in ("linear", *(x for x in structures if x != "linear")):
        if s == "knots":
            bic, knots, theta, names = _fit_knots(terms, v, y, drop)
            beta = jump_at = None
        else:
            bic, beta, jump_at, theta, names = _fit_structure(terms, v, y, s, drop)
            knots = None
        if best is None or bic < best[0] - 1e-9:
            best = (bic, s, beta, jump_at, theta, names, knots)
    _, s, beta, jump_at, theta, names, knots = best
    coefs = {k: float(c) for k, c in zip(names, theta)}
    fitted = FittedTerm(terms, s, beta if _HAS_HINGE[s] else None, coefs, jump_at if _HAS_JUMP[s] else None,
                        points=len(rows), dropped=tuple(drop), knots=knots)
    rel = np.abs(fitted.predict(v) - y) / y
    fitted.mean_rel_error, fitted.max_rel_error = float(rel.mean()), float(rel.max())
    return fitted


# ---- the model -------------------------------------------------------------------------------------------------
@dataclass
class CostModel:
    """Fitted verify / draft / train costs (seconds). Build with :meth:`fit`, :meth:`from_table` or :meth:`load`.

    The evaluation methods are plain float arithmetic on the stored coefficients (a few microseconds per call,
    so a simulator can call them every iteration); :meth:`FittedTerm.predict` is the vectorised form.
    """

    verify: FittedTerm
    draft: FittedTerm | None = None
    train: FittedTerm | None = None
    source: dict = field(default_factory=dict)
    prefill: FittedTerm | None = None
    #: :meth:`depth_seconds`' context-free parts per (batch size, lo, hi)
    _depth_memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ---- building ----
    @classmethod
    def fit(cls, profile: Mapping[str, Any] | str | Path, statistic: str = "seconds") -> CostModel:
        """Fit a profile dict (validated here) or a profile file.

        ``statistic``: the entry field to fit, ``seconds`` (the median; default) or ``min_seconds`` (the least
        disturbed sample, where the profiler recorded it: the machine's best case rather than its typical case).
        """
        if statistic not in ("seconds", "min_seconds", "max_seconds"):
            raise ValueError(f"statistic must be seconds, min_seconds or max_seconds, got {statistic!r}")
        if isinstance(profile, (str, Path)):
            prof = load_profile(profile)
            src_name = str(profile)
        else:
            prof = validate_profile(profile)
            src_name = "<dict>"
        if not prof["target"]:
            raise ProfileError(f"{src_name}: target must list at least one measured forward (the verify cost needs it)")
        verify = fit_term(VERIFY, prof["target"], statistic=statistic)
        draft = None
        if prof["draft"]:
            one_depth = len({r["depth"] for r in prof["draft"]}) == 1
            draft = fit_term(DRAFT, prof["draft"], drop=("call", "call_per_request") if one_depth else (),
                             statistic=statistic)
        train = fit_term(TRAIN, prof["train"], statistic=statistic) if prof["train"] else None
        prefill = fit_term(PREFILL, prof["prefill"], statistic=statistic) if prof["prefill"] else None
        meta = prof["meta"]
        hw = meta.get("hardware")
        source = {"profile": src_name, "model": meta.get("model"),
                  "hardware": hw.get("summary", hw) if isinstance(hw, dict) else hw,
                  "device": meta.get("device"), "dtype": meta.get("dtype"), "date": meta.get("date"),
                  "statistic": statistic, "ranges": _ranges(prof),
                  "max_positions": (meta.get("architecture") or {}).get("max_position_embeddings")}
        return cls(verify, draft, train, source, prefill)

    @classmethod
    def from_table(cls, target: Iterable[Sequence[float]], draft: Iterable[Sequence[float]] = (),
                   train: Iterable[Sequence[float]] = (), model: str = "table", hardware: str = "table",
                   prefill: Iterable[Sequence[float]] = ()) -> CostModel:
        """Fit from plain tuples, e.g. numbers copied from a published GPU table.

        ``target``: ``(batch_size, tokens_per_request, context_len, seconds)``; ``draft``: ``(batch_size, depth,
        seconds)``; ``train``: ``(tokens, seconds)``; ``prefill``: ``(tokens, context_len, seconds)``.
        """
        prof = {"format": PROFILE_FORMAT, "meta": {"model": model, "hardware": hardware, "source": "from_table"},
                "target": [dict(zip(("batch_size", "tokens_per_request", "context_len", "seconds"), r)) for r in target],
                "draft": [dict(zip(("batch_size", "depth", "seconds"), r)) for r in draft],
                "train": [dict(zip(("tokens", "seconds"), r)) for r in train],
                "prefill": [dict(zip(("tokens", "context_len", "seconds"), r)) for r in prefill]}
        return cls.fit(prof)

    # ---- evaluation ----
    def verify_seconds(self, batch_size: int, tokens_per_request: int, context_len: int = 0) -> float:
        """One target forward over ``batch_size`` requests of ``tokens_per_request`` nodes, ``context_len`` committed each."""
        if batch_size <= 0 or tokens_per_request <= 0:
            return 0.0
        f = self.verify
        c = f.coefficients
        B, n, ctx = float(batch_size), float(batch_size * tokens_per_request), float(context_len)
        return f.curve_at(n) + c.get("per_request", 0.0) * B + \
            (c.get("per_kv_token", 0.0) * B + c.get("per_attention_pair", 0.0) * n) * ctx

    def prefill_seconds(self, tokens: int, context_len: int = 0) -> float:
        """One prefill chunk of ``tokens`` prompt tokens after ``context_len`` committed ones (one request).

        Without prefill entries in the profile: ``verify_seconds(1, tokens, context_len)`` (the same forward with
        logits, extrapolated from verify sizes: a rough stand-in).
        """
        if tokens <= 0:
            return 0.0
        f = self.prefill
        if f is None:
            return self.verify_seconds(1, tokens, context_len)
        c = f.coefficients
        P, ctx = float(tokens), float(context_len)
        return f.curve_at(P) + c.get("per_kv_token", 0.0) * ctx + \
            c.get("per_attention_pair", 0.0) * (P * ctx + P * (P + 1) / 2)

    def prefill_batch_seconds(self, chunks: Sequence[tuple[int, int]]) -> float:
        """One prefill forward over several requests' chunks ``[(P_i tokens, c_i committed before it), ...]``.

        The token-linear part of the forward (its GEMMs and its fixed cost) is paid once, for the batch's total
        tokens; attention is each chunk's own, since a chunk attends only to its own request's ``c_i`` cached
        positions and its own tokens::

            T = sum_i P_i
            cost = curve(T) + sum_i [per_kv_token * c_i + per_attention_pair * (P_i * c_i + P_i * (P_i + 1) / 2)]

        One chunk gives :meth:`prefill_seconds`. Pricing the batch as one prompt of ``T`` tokens after the mean
        prefix instead would charge ``T^2 / 2`` attention pairs for chunks that never attend to each other, and give
        a long prompt's later chunk the mean prefix rather than its own. Without prefill entries the verify formula
        stands in the same way (its ``per_request`` term once per chunk).
        """
        chunks = [(int(p), int(c)) for p, c in chunks if p > 0]
        if not chunks:
            return 0.0
        total = float(sum(p for p, _ in chunks))
        f = self.prefill
        if f is None:
            v = self.verify.coefficients
            return self.verify.curve_at(total) + sum(
                v.get("per_request", 0.0) + (v.get("per_kv_token", 0.0) + v.get("per_attention_pair", 0.0) * p) * c
                for p, c in chunks)
        co = f.coefficients
        kv, pair = co.get("per_kv_token", 0.0), co.get("per_attention_pair", 0.0)
        return f.curve_at(total) + sum(kv * c + pair * (p * c + p * (p + 1) / 2) for p, c in chunks)

    def depth_seconds(self, batch_size: int, lo: int, hi: int, context_len: int = 0) -> list[float]:
        r"""One decode step's seconds at every depth ``c = lo..hi``:

        .. math::  S(c) = V(b, c + 1) + D(b, c), \qquad D(b, 0) = 0

        the same floats as :meth:`verify_seconds` ``+`` :meth:`draft_seconds` one depth at a time. Why: a
        cost-aware policy prices every candidate depth of every step; the parts that do not depend on the context
        length are kept per ``(b, lo, hi)``, so a step's prices are two array operations.
        """
        base, per_ctx, draft = self.depth_parts(batch_size, lo, hi)
        return (base + per_ctx * float(context_len) + draft).tolist()

    def depth_parts(self, batch_size: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The parts of :meth:`depth_seconds`, ``S(c) = (base + per_ctx · C) + draft`` at depths ``lo..hi``
        (memoised per ``(b, lo, hi)``; each entry depends on its own depth only, so any range holding ``c`` gives
        the same floats at ``c``): what a compiled policy step prices its candidate depths with."""
        key = (batch_size, lo, hi)
        parts = self._depth_memo.get(key)
        if parts is None:
            if len(self._depth_memo) >= 4096:
                self._depth_memo.clear()
            parts = self._depth_memo[key] = self._depth_parts(batch_size, lo, hi)
        return parts

    def _depth_parts(self, batch_size: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``V = base + per_ctx · ctx`` and ``D`` of :meth:`depth_seconds`, each in :meth:`verify_seconds`' and
        :meth:`draft_seconds`' own order of operations."""
        depths = np.arange(lo, hi + 1)
        if batch_size <= 0:
            zero = np.zeros(len(depths))
            return zero, zero, zero
        B = float(batch_size)
        n = [float(batch_size * (d + 1)) for d in range(lo, hi + 1)]
        c = self.verify.coefficients
        base = np.array([self.verify.curve_at(x) for x in n]) + c.get("per_request", 0.0) * B
        per_ctx = c.get("per_kv_token", 0.0) * B + c.get("per_attention_pair", 0.0) * np.array(n)
        draft = np.zeros(len(depths))
        if hi > 0:
            if self.draft is None:
                self.draft_seconds(batch_size, hi)  # raises the error naming the profile
            g = self.draft.coefficients
            const = g.get("call", 0.0) + g.get("call_per_request", 0.0) * B
            draft = np.where(depths > 0, const + depths * self.draft.curve_at(B), 0.0)
        return base, per_ctx, draft

    def draft_seconds(self, batch_size: int, depth: int) -> float:
        """``depth`` sequential draft steps for ``batch_size`` requests (0 for depth 0)."""
        if depth <= 0 or batch_size <= 0:
            return 0.0
        if self.draft is None:
            raise ValueError(f"cost model of {self.source.get('profile', '?')}: the profile has no 'draft' entries "
                             "(profile with --parts draft, or add measured draft times)")
        f = self.draft
        c = f.coefficients
        B = float(batch_size)
        return c.get("call", 0.0) + c.get("call_per_request", 0.0) * B + depth * f.curve_at(B)

    def train_seconds(self, tokens: int) -> float:
        """One drafter optimiser step on ``tokens`` tokens (0 for none)."""
        if tokens <= 0:
            return 0.0
        if self.train is None:
            raise ValueError(f"cost model of {self.source.get('profile', '?')}: the profile has no 'train' entries")
        return self.train.curve_at(float(tokens))

    # ---- reporting ----
    def fit_report(self) -> dict:
        """Per formula: the stated model, structure, breakpoint, coefficients and mean / max relative error."""
        rep: dict[str, Any] = {"source": self.source}
        for name in _TERMS:
            f = getattr(self, name)
            rep[name] = None if f is None else f.to_dict()
        return rep

    def describe(self) -> str:
        """The fit report as text (one paragraph per formula)."""
        lines = [f"cost model of {self.source.get('model')} on {self.source.get('hardware')}"]
        for name in _TERMS:
            f = getattr(self, name)
            if f is None:
                lines.append(f"{name}: not profiled")
                continue
            coefs = ", ".join(f"{k}={v:.4g}" for k, v in f.coefficients.items() if v)
            bp = "" if f.knots is None else f" through {len(f.knots)} knots"
            bp += "" if f.breakpoint is None else f", hinge at {f.breakpoint:.3g}"
            bp += "" if f.jump_at is None else f", jump past {f.jump_at:.3g}"
            lines.append(f"{name}: {f.structure}{bp}; {coefs}; {f.points} points, mean rel. error "
                         f"{f.mean_rel_error:.1%}, max {f.max_rel_error:.1%}")
        return "\n".join(lines)

    # ---- persistence ----
    def to_dict(self) -> dict:
        out: dict[str, Any] = {"format": MODEL_FORMAT, "source": self.source}
        for name in _TERMS:
            f = getattr(self, name)
            out[name] = None if f is None else f.to_dict()
        return out

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(p)
        return p

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> CostModel:
        if not isinstance(d, Mapping) or d.get("format") != MODEL_FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ProfileError(f"{source}: format must be {MODEL_FORMAT!r}, got {got!r}")
        if not isinstance(d.get("verify"), Mapping):
            raise ProfileError(f"{source}: verify must be an object")
        parts = {}
        for name, terms in _TERMS.items():
            sub = d.get(name)
            if sub is None:
                parts[name] = None
                continue
            if not isinstance(sub, Mapping):
                raise ProfileError(f"{source}: {name} must be an object or null")
            parts[name] = FittedTerm.from_dict(terms, sub, f"{source}: {name}")
        return cls(parts["verify"], parts["draft"], parts["train"], dict(d.get("source") or {}), parts["prefill"])

    @classmethod
    def fit_cached(cls, path: str | Path, cache_dir: str | Path | None,
                   statistic: str = "seconds") -> CostModel:
        """:meth:`fit` of a profile file, remembered under ``cache_dir`` (None: no cache, just fit).

        Why: the fit takes milliseconds but needs ``scipy.optimize``, whose import is about 0.4 s, a third of a
        short ``sim replay``. The key is the SHA-256 of the profile's bytes, its path, ``statistic`` and this
        module's own source, so an edited profile or fitting code fits again. A cache that cannot be read or
        written is passed over (the fit runs; a bad profile still fails in :meth:`fit`, naming the file).
        """
        if cache_dir is None:
            return cls.fit(path, statistic)
        try:
            key = hashlib.sha256(Path(path).read_bytes())
        except OSError:
            return cls.fit(path, statistic)  # raises the profile error that names the file
        for part in (str(path), statistic):
            key.update(b"\0" + part.encode())
        key.update(Path(__file__).read_bytes())
        cached = Path(cache_dir) / f"{key.hexdigest()[:32]}.json"
        try:
            return cls.from_dict(json.loads(cached.read_text()), str(cached))
        except (OSError, ValueError):  # absent, unreadable or not a model (ProfileError is a ValueError)
            pass
        model = cls.fit(path, statistic)
        try:
            model.save(cached)
        except OSError:
            pass
        return model

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        """A saved cost model, or a profile (fitted on load): the file's ``format`` decides."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except OSError as e:
            raise ProfileError(f"{p}: cannot read ({e.strerror or e})") from e
        except json.JSONDecodeError as e:
            raise ProfileError(f"{p}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from e
        if isinstance(data, dict) and data.get("format") == PROFILE_FORMAT:
            return cls.fit(p)
        return cls.from_dict(data, str(p))


def _ranges(prof: Mapping[str, Any]) -> dict:
    """The measured ranges (predictions outside them are extrapolations)."""
    out: dict[str, Any] = {}
    t = prof["target"]
    out["verify"] = {"batch_size": [min(r["batch_size"] for r in t), max(r["batch_size"] for r in t)],
                     "tokens_per_request": [min(r["tokens_per_request"] for r in t), max(r["tokens_per_request"] for r in t)],
                     "context_len": [min(r["context_len"] for r in t), max(r["context_len"] for r in t)]}
    if prof["prefill"]:
        pf = prof["prefill"]
        out["prefill"] = {"tokens": [min(r["tokens"] for r in pf), max(r["tokens"] for r in pf)],
                          "context_len": [min(r["context_len"] for r in pf), max(r["context_len"] for r in pf)]}
    if prof["draft"]:
        d = prof["draft"]
        out["draft"] = {"batch_size": [min(r["batch_size"] for r in d), max(r["batch_size"] for r in d)],
                        "depth": [min(r["depth"] for r in d), max(r["depth"] for r in d)]}
    if prof["train"]:
        out["train"] = {"tokens": [min(r["tokens"] for r in prof["train"]), max(r["tokens"] for r in prof["train"])]}
    return out


__all__ = [
    "DRAFT",
    "MODEL_FORMAT",
    "PREFILL",
    "PROFILE_FORMAT",
    "TRAIN",
    "VERIFY",
    "CostModel",
    "FittedTerm",
    "ProfileError",
    "fit_term",
    "load_profile",
    "validate_profile",
]
