"""Fit a trace's statistics and generate new traces from them: any size, any rate, deterministic per seed.

Why a generator: the real traces are one hour of one service; tuning and load sweeps need the same *shape* of
workload at other rates and lengths of time, and tests need traces that are small and reproducible.

What is fitted (:func:`fit_trace`), and why this model:

- **Arrivals: a Gamma renewal process.** Inter-arrival gaps are i.i.d. Gamma with the trace's mean gap and CV, i.e.
  shape ``k = 1 / CV**2`` (method of moments). CV = 1 is Poisson; CV > 1 is bursty (Azure 2023 code: CV 13, k 0.006).
  Moments rather than maximum likelihood because the CV is the number the burstiness literature quotes and MLE is
  dominated by the many near-zero gaps of a bursty trace. What it cannot keep: slow changes of the rate over the
  hour (the Azure code trace ranges 15-632 req/min); replay the trace itself for those.
- **Lengths: empirical quantiles joined by a Gaussian copula.** Prompt and output lengths are stored as quantile
  tables (:data:`QUANTILE_PROBS`) and sampled by inverse-CDF, interpolating log-lengths between stored quantiles.
  Real length distributions are multi-modal and clipped (context windows, max_tokens), which a lognormal misses;
  a quantile table keeps the medians and tails of the source. Prompt and output lengths are correlated (long code
  contexts, short completions), so a Gaussian copula on their normal scores keeps that rank correlation (``rho``).
- **Categories: the mix**, drawn i.i.d. per request (a shift of mix over time is built with :meth:`Trace.then`).
- Acceptance records are not fitted: acceptance belongs to a drafter and policy, not to the workload.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from sglang_ext.formats.trace import Request, Trace, TraceMeta, interarrival_cv

FIT_KIND = "sglang-ext.trace-fit"
FIT_VERSION = 1
#: probabilities of the stored length quantiles: every 0.5 %, plus 0.1 % and 99.9 % for the tails
QUANTILE_PROBS: tuple[float, ...] = tuple(sorted({round(p, 4) for p in np.linspace(0, 1, 201)} | {0.001, 0.999}))


@dataclass(frozen=True)
class LengthDist:
    """A length distribution as a quantile table: ``values[i]`` tokens at cumulative probability ``probs[i]``."""

    probs: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.probs) != len(self.values) or len(self.probs) < 2:
            raise ValueError("a length quantile table needs matching probs and values, at least two of each")
        if self.probs[0] != 0.0 or self.probs[-1] != 1.0 or any(b <= a for a, b in zip(self.probs, self.probs[1:])):
            raise ValueError("length quantile probs must increase strictly from 0 to 1")
        if any(v < 1 for v in self.values) or any(b < a for a, b in zip(self.values, self.values[1:])):
            raise ValueError("length quantile values must be >= 1 and non-decreasing")

    @classmethod
    def empirical(cls, lengths: np.ndarray) -> LengthDist:
        values = np.quantile(np.asarray(lengths, dtype=float), QUANTILE_PROBS)
        return cls(QUANTILE_PROBS, tuple(float(v) for v in values))

    @classmethod
    def lognormal(cls, median: float, sigma: float, max_tokens: int | None = None) -> LengthDist:
        """A lognormal table, its ends clipped at the 0.01 % / 99.99 % points (and at ``max_tokens``)."""
        probs = np.asarray(QUANTILE_PROBS)
        values = sps.lognorm.ppf(np.clip(probs, 1e-4, 1 - 1e-4), s=sigma, scale=median)
        values = np.clip(values, 1.0, max_tokens if max_tokens else np.inf)
        return cls(QUANTILE_PROBS, tuple(float(v) for v in values))

    def sample(self, u: np.ndarray) -> np.ndarray:
        """Lengths at uniform draws ``u`` (inverse CDF, linear in log-length between stored quantiles)."""
        logs = np.interp(u, self.probs, np.log(self.values))
        return np.maximum(np.rint(np.exp(logs)), 1).astype(np.int64)

    @property
    def median(self) -> float:
        return float(np.exp(np.interp(0.5, self.probs, np.log(self.values))))


@dataclass(frozen=True)
class TraceFit:
    """Fitted workload statistics; JSON round-trips through :meth:`to_dict` / :meth:`from_dict`."""

    rate: float  # requests per second
    interarrival_cv: float  # 0: evenly spaced; 1: Poisson; > 1: bursty
    prompt: LengthDist
    output: LengthDist
    length_rho: float = 0.0  # correlation of the normal scores of prompt and output lengths
    categories: dict[str, float] = field(default_factory=dict)  # category -> probability
    source: str = ""
    licence: str = ""
    num_requests: int = 0  # requests the fit was made from

    @property
    def gamma_shape(self) -> float:
        """Shape k of the Gamma inter-arrival law (= 1/CV^2; infinite for evenly spaced arrivals)."""
        return math.inf if self.interarrival_cv == 0 else 1.0 / self.interarrival_cv ** 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("prompt", "output"):
            d[name] = {"probs": list(d[name]["probs"]), "values": list(d[name]["values"])}
        return {"kind": FIT_KIND, "version": FIT_VERSION, "arrival_model": "gamma-renewal",
                "gamma_shape": None if math.isinf(self.gamma_shape) else self.gamma_shape,
                "length_model": "empirical-quantiles+gaussian-copula", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TraceFit:
        if d.get("kind") != FIT_KIND:
            raise ValueError(f"not a trace fit: kind={d.get('kind')!r} (expected {FIT_KIND!r})")
        if d.get("version") != FIT_VERSION:
            raise ValueError(f"trace fit version {d.get('version')!r} is not supported (expected {FIT_VERSION})")
        try:
            return cls(rate=float(d["rate"]), interarrival_cv=float(d["interarrival_cv"]),
                       prompt=LengthDist(tuple(d["prompt"]["probs"]), tuple(d["prompt"]["values"])),
                       output=LengthDist(tuple(d["output"]["probs"]), tuple(d["output"]["values"])),
                       length_rho=float(d.get("length_rho", 0.0)), categories=dict(d.get("categories", {})),
                       source=d.get("source", ""), licence=d.get("licence", ""),
                       num_requests=int(d.get("num_requests", 0)))
        except KeyError as e:
            raise ValueError(f"trace fit is missing {e.args[0]!r}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> TraceFit:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def normal_scores(x: np.ndarray) -> np.ndarray:
    """Ranks mapped to standard normal quantiles (ties share their average rank)."""
    return sps.norm.ppf(sps.rankdata(x) / (len(x) + 1))


def fit_trace(trace: Trace) -> TraceFit:
    """Fit arrivals (Gamma renewal), lengths (quantiles + copula) and the category mix of ``trace``."""
    if len(trace) < 3:
        raise ValueError(f"fitting needs at least 3 requests, the trace has {len(trace)}")
    arr = trace.arrivals
    mean_gap = float(np.diff(arr).mean())
    if mean_gap <= 0:
        raise ValueError("all requests arrive at the same instant: no arrival rate to fit")
    prompt, output = trace.prompt_tokens, trace.output_tokens
    rho = 0.0
    if np.ptp(prompt) > 0 and np.ptp(output) > 0:
        rho = float(np.corrcoef(normal_scores(prompt), normal_scores(output))[0, 1])
    cats: dict[str, int] = {}
    for r in trace:
        if r.category is not None:
            cats[r.category] = cats.get(r.category, 0) + 1
    total = sum(cats.values())
    return TraceFit(rate=1.0 / mean_gap, interarrival_cv=interarrival_cv(arr),
                    prompt=LengthDist.empirical(prompt), output=LengthDist.empirical(output), length_rho=rho,
                    categories={c: n / total for c, n in sorted(cats.items())},
                    source=trace.meta.name or trace.meta.source, licence=trace.meta.licence,
                    num_requests=len(trace))


def gamma_arrivals(rng: np.random.Generator, n: int, rate: float, cv: float, exact_rate: bool = True) -> np.ndarray:
    """``n`` arrival times from 0: Gamma(k = 1/cv^2, mean 1/rate) gaps; ``cv == 0`` spaces them evenly.

    With ``exact_rate`` the gaps are rescaled so the trace's rate is exactly ``rate`` (a common factor leaves their
    CV unchanged). Without it a bursty trace misses its rate badly: with CV 13 the mean of 5,000 gaps has the
    spread of about 5000/13^2 = 30 samples, so a load sweep would not sweep the load it names.
    """
    if n <= 0:
        return np.zeros(0)
    if cv == 0:
        gaps = np.full(n - 1, 1.0 / rate)
    else:
        k = 1.0 / cv ** 2
        gaps = rng.gamma(shape=k, scale=1.0 / (k * rate), size=n - 1)
        if exact_rate and gaps.sum() > 0:
            gaps *= (n - 1) / (rate * gaps.sum())
    return np.concatenate([[0.0], np.cumsum(gaps)])


def generate(fit: TraceFit, num_requests: int, rate: float | None = None, seed: int = 0,
             name: str | None = None, exact_rate: bool = True) -> Trace:
    """A synthetic trace from ``fit``: ``num_requests`` requests at ``rate`` req/s (the fitted rate by default).

    Deterministic for a seed. ``exact_rate`` rescales the gaps so the trace's rate is exactly ``rate`` (see
    :func:`gamma_arrivals`). Arrivals are rounded to microseconds (rounding keeps their order).
    """
    if num_requests < 0:
        raise ValueError(f"num_requests={num_requests} must be >= 0")
    rate = fit.rate if rate is None else rate
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate={rate} must be a finite number > 0")
    rng = np.random.default_rng(seed)
    arrivals = np.round(gamma_arrivals(rng, num_requests, rate, fit.interarrival_cv, exact_rate), 6)
    rho = float(np.clip(fit.length_rho, -0.999, 0.999))
    z = rng.standard_normal((num_requests, 2))
    z[:, 1] = rho * z[:, 0] + math.sqrt(1 - rho * rho) * z[:, 1]
    u = sps.norm.cdf(z)
    prompt, output = fit.prompt.sample(u[:, 0]), fit.output.sample(u[:, 1])
    if fit.categories:
        names = sorted(fit.categories)
        p = np.array([fit.categories[c] for c in names], dtype=float)
        cats: list[str | None] = [names[i] for i in rng.choice(len(names), size=num_requests, p=p / p.sum())]
    else:
        cats = [None] * num_requests
    reqs = tuple(Request(float(arrivals[i]), int(prompt[i]), int(output[i]), cats[i]) for i in range(num_requests))
    licence = f"synthetic; fitted statistics of: {fit.licence}" if fit.licence else "synthetic"
    meta = TraceMeta(name=name or f"synthetic-{fit.source or 'fit'}",
                     source=f"sglang-ext trace generate (fit of {fit.source or '?'}, rate {rate:g}/s, seed {seed})",
                     licence=licence)
    return Trace(reqs, meta)


# ---- hand-specified workloads (the self-made traces in traces/) -------------------------------------------------
def preset_fit(rate: float, cv: float, prompt_median: float, prompt_sigma: float, output_median: float,
               output_sigma: float, rho: float = 0.0, categories: dict[str, float] | None = None,
               source: str = "preset", max_tokens: int = 8192) -> TraceFit:
    """A :class:`TraceFit` written by hand: lognormal lengths, Gamma arrivals. For traces with no data behind them."""
    return TraceFit(rate=rate, interarrival_cv=cv, prompt=LengthDist.lognormal(prompt_median, prompt_sigma, max_tokens),
                    output=LengthDist.lognormal(output_median, output_sigma, max_tokens), length_rho=rho,
                    categories=dict(categories or {}), source=source, licence="")


#: Rough per-category workloads. chat: ShareGPT-like (prompt p50 ~730, output p50 ~630 in the reference's sample,
#: outputs shortened here); code: Azure 2023 code-like (long contexts, short completions); math: GSM8K-like short
#: word problems with step-by-step answers. Poisson arrivals (CV 1) unless a trace says otherwise.
PRESETS: dict[str, TraceFit] = {
    "chat": preset_fit(2.0, 1.0, 300, 0.9, 150, 0.8, rho=0.1, categories={"chat": 1.0}, source="preset-chat"),
    "code": preset_fit(2.0, 1.0, 1400, 0.8, 20, 1.0, rho=-0.2, categories={"code": 1.0}, source="preset-code"),
    "math": preset_fit(2.0, 1.0, 120, 0.4, 180, 0.5, rho=0.3, categories={"math": 1.0}, source="preset-math"),
}


def example_traces() -> dict[str, Trace]:
    """The self-made traces shipped in ``traces/`` (a test checks the files equal this recipe's output)."""
    tiny = generate(PRESETS["chat"], 50, seed=1, name="tiny_chat")
    phases = [generate(PRESETS[c], 40, rate=1.0, seed=10 + i) for i, c in enumerate(("chat", "code", "math"))]
    shift = phases[0].then(phases[1], gap=1.0).then(phases[2], gap=1.0)
    shift_meta = TraceMeta(name="shift_chat_code_math", source="sglang-ext simulator.generator.example_traces: "
                           "40 chat, then 40 code, then 40 math requests, Poisson at 1 req/s, 1 s gaps", licence="Apache-2.0 (self-made)")
    tiny_meta = TraceMeta(name="tiny_chat", source="sglang-ext simulator.generator.example_traces: PRESETS['chat'], "
                          "50 requests, Poisson at 2 req/s, seed 1", licence="Apache-2.0 (self-made)")
    return {"tiny_chat": replace(tiny, meta=tiny_meta), "shift_chat_code_math": replace(shift, meta=shift_meta)}
