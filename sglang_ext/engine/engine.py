"""The reference engine: continuous batching with one speculative step per iteration.

Each :meth:`Engine.step`:

1. **admit** waiting requests into free batch slots and prefill them (``prompt[:-1]``, in chunks; the last
   prompt token is the first step's root), handing the prefill's hidden states to the drafter;
2. **draft**: one tree per running request (``num_steps`` deep; no drafts when speculation is off);
3. **one target forward** over the padded batch of trees with a tree attention mask, writing K/V for every node;
4. **verify** each request with the core's rules (greedy argmax walk, or lossless stochastic verification of
   the processed distribution with the request's own seeded generator);
5. **commit**: keep the K/V of the root and the accepted path only (rollback of everything else), give the
   drafter the accepted positions' hidden states, append tokens, apply stop conditions;
6. **finish** requests and compact the batch so live requests always occupy slots ``0..B-1``.

With speculation off the same loop feeds one token per request per forward: plain decoding, so speedups
compare like with like.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from sglang_ext.core.drafters.base import Draft, Drafter, DraftRequest
from sglang_ext.core.greedy import verify_greedy_tree
from sglang_ext.core.learning.capture import draft_correct_for_step
from sglang_ext.core.policies.base import BatchView, Decision, Policy
from sglang_ext.core.signals import RequestStep, StepResult
from sglang_ext.core.processing import SamplingParams, check_finite, process_logits
from sglang_ext.core.random_source import TorchRandomSource
from sglang_ext.core.tree_verify import verify_tree

from .target import TargetModel


class RequestError(ValueError):
    """A request the engine cannot serve; the message starts with the offending field (``"prompt: ..."``), which
    is also ``.field`` so a server can point at it."""

    @property
    def field(self) -> str:
        return str(self).split(":", 1)[0]


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    rid: str | None = None
    #: record the logprob of every emitted token (``RequestState.output_token_logprobs``; convention:
    #: :func:`token_logprobs`)
    logprobs: bool = False
    #: also record the ``top_logprobs`` most likely tokens at every emitted position (0..20; > 0 implies ``logprobs``)
    top_logprobs: int = 0


@dataclass
class RequestState:
    """A request in flight, with SGLang's per-request speculative counters."""

    request: GenerationRequest
    rid: str
    output_ids: list[int] = field(default_factory=list)
    #: logprob of each output token (aligned with ``output_ids``) when the request asked for logprobs, else empty
    output_token_logprobs: list[float] = field(default_factory=list)
    #: per output token, the ``top_logprobs`` best ``(token_id, logprob)`` pairs (decreasing logprob, ties by lowest
    #: id), aligned with ``output_ids`` when ``top_logprobs > 0``, else empty
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    slot: int = -1
    rng: TorchRandomSource | None = None
    finished: bool = False
    finish_reason: dict | None = None
    text: str | None = None
    spec_verify_ct: int = 0
    spec_num_correct_drafts: int = 0
    spec_num_proposed_drafts: int = 0
    spec_correct_drafts_histogram: list[int] = field(default_factory=list)
    accept_record: list[int] = field(default_factory=list)  # accepted draft tokens per verify step (trace replay)
    drafter_versions: set[int] = field(default_factory=set)  # drafter weights versions that proposed for this request
    t_arrival: float = 0.0
    t_first_token: float | None = None
    t_finish: float | None = None
    on_tokens: Callable[["RequestState", list[int]], None] | None = None

    @property
    def tokens(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    def meta_info(self) -> dict:
        """SGLang's ``meta_info`` fields for this request (names and meanings as in SGLang 0.5.23)."""
        n = len(self.output_ids)
        info = {
            "id": self.rid, "prompt_tokens": len(self.request.prompt_ids), "completion_tokens": n,
            "finish_reason": self.finish_reason, "spec_verify_ct": self.spec_verify_ct,
        }
        if self.spec_verify_ct:
            info.update(
                spec_num_correct_drafts=self.spec_num_correct_drafts,
                spec_num_proposed_drafts=self.spec_num_proposed_drafts,
                spec_accept_rate=(self.spec_num_correct_drafts / self.spec_num_proposed_drafts
                                  if self.spec_num_proposed_drafts else 0.0),
                spec_accept_length=n / self.spec_verify_ct,
                spec_correct_drafts_histogram=list(self.spec_correct_drafts_histogram),
            )
        if self.t_finish is not None:
            info["e2e_latency"] = self.t_finish - self.t_arrival
        if self.t_first_token is not None:
            info["ttft"] = self.t_first_token - self.t_arrival
        return info


@dataclass
class EngineConfig:
    max_batch_size: int = 8
    context_length: int | None = None  # default: the model's max positions, capped at 4096
    num_steps: int = 0  # draft depth per step; 0 = speculation off
    topk: int = 1
    num_draft_tokens: int | None = None  # tree node budget incl. the root (topk > 1)
    prefill_chunk: int = 512
    eos_token_ids: tuple[int, ...] = ()
    #: per-step fast path (cached tree shapes, greedy rows verified from one batched argmax); False runs the
    #: reference path (a DraftTree per request and the core's tree verifiers): identical results, more overhead.
    #: The target's own fast forward is ``TargetModel.use_fast_forward`` (env ``SGLANG_EXT_FAST_FORWARD=0``: off).
    fast_paths: bool = True
    #: speculation-control policy (``sglang_ext.core.policies``): decides each step's per-request draft lengths
    #: (capped at ``num_steps``, which sizes the buffers) and whether to speculate at all; None: always ``num_steps``
    policy: Policy | None = None


@dataclass
class StepStats:
    """What one step did (the policies and the capture buffer of later issues consume these)."""

    batch_size: int = 0
    prefill_tokens: int = 0
    draft_seconds: float = 0.0  # the whole drafter call, catch-up included
    catch_up_seconds: float = 0.0  # of which the drafter's split catch-up on long backlogs
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0
    nodes_per_request: list[int] = field(default_factory=list)
    accepted_per_request: list[int] = field(default_factory=list)


def _last_token(state: RequestState) -> int:
    return state.output_ids[-1] if state.output_ids else state.request.prompt_ids[-1]


#: the most ``top_logprobs`` a request may ask for (OpenAI's limit)
MAX_TOP_LOGPROBS = 20


def token_logprobs(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """The log-probabilities the engine reports for tokens emitted from ``logits`` (``[..., V]``; float32 out).

    The convention is SGLang 0.5.23's (``Sampler.forward`` and, for speculative steps, ``compute_spec_logprobs``).
    Terminology:

    * ``z``: the target's raw logits at the position that emitted the token (for a speculative step, the
      tree node whose prediction it is: the root for the first emitted token, accepted node ``j`` for the next);
    * ``T``: the request's temperature; ``top_k`` / ``top_p``: its truncation parameters.

    Then, for every token ``v`` of the vocabulary::

        greedy request (T == 0, or top_k == 1):  logprob(v) = log_softmax(z)[v]     = z_v - log sum_u exp(z_u)
        sampled request (T > 0):                 logprob(v) = log_softmax(z / T)[v] = z_v / T - log sum_u exp(z_u / T)

    Top-k / top-p truncation is *not* applied: the value is ``log softmax(z / T)``, the distribution before
    truncation, even though the token was sampled from ``top_p(top_k(softmax(z / T)))`` renormalised.
    Why this convention:

    * a client comparing with SGLang gets the same numbers (SGLang returns ``log(softmax(z / T))`` computed
      before its top-k / top-p sampling; like SGLang's single-request greedy batch, ``top_k == 1`` counts as greedy);
    * every value is finite for every token, including tokens truncation would never emit (``-inf`` logits, a
      masked token, are clamped to the float32 minimum as SGLang does), so ``top_logprobs`` lists are always full;
    * it depends only on the target's logits at that position, not on how the token was produced (drafted and
      accepted, resampled from a residual after a rejection, or the bonus token), so speculation on and off
      report the same values for the same tokens.
    """
    x = logits.float()
    if not sampling.greedy:
        x = x / sampling.temperature
    lp = torch.log_softmax(x, dim=-1)
    return lp.clamp_(min=torch.finfo(lp.dtype).min)


def _top_logprobs(lp: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Per row of ``lp`` (``[M, V]``), the ``k`` best ``(token_id, logprob)`` pairs: decreasing logprob, ties by lowest
    token id (exact at the boundary: every token tied with the k-th value is a candidate, then a stable sort)."""
    k = min(k, lp.shape[-1])
    kth = lp.topk(k, dim=-1).values[:, -1:]
    rows = []
    for row, t in zip(lp, kth):
        ids = torch.nonzero(row >= t).squeeze(1)  # ascending ids, at least k of them
        vals = row[ids]
        order = torch.sort(vals, descending=True, stable=True).indices[:k]
        rows.append(list(zip(ids[order].tolist(), vals[order].tolist())))
    return rows


@dataclass(frozen=True)
class _TreeShape:
    """What the step needs about one tree shape (a ``parents`` list), padded to ``width`` nodes.

    Exactly what :class:`DraftTree` derives (``depths``, ``children`` in index order, ancestor-or-self
    ``attention_mask``), laid out as the step batch wants it: padding nodes see only themselves at depth 0.
    Shapes repeat step after step (a chain of length k is always the same shape), so they are built once.
    """

    depths: list[int]  # [width]
    children: list[list[int]]  # per real node, in index order
    visible: torch.Tensor  # [width, width] bool

    @staticmethod
    def build(parents: list[int], width: int) -> "_TreeShape":
        n = len(parents)
        if n < 1 or parents[0] != -1:
            raise ValueError("draft tree: node 0 must be the root (parent -1)")
        depths = [0] * width
        children: list[list[int]] = [[] for _ in range(n)]
        rows = [[i == j for j in range(width)] for i in range(width)]
        for i in range(1, n):
            p = parents[i]
            if not 0 <= p < i:
                raise ValueError(f"draft tree: node {i} has parent {p}; need 0 <= parent < node (topological order)")
            depths[i] = depths[p] + 1
            children[p].append(i)
            rows[i] = [a or b for a, b in zip(rows[i], rows[p])]
        return _TreeShape(depths=depths, children=children, visible=torch.tensor(rows, dtype=torch.bool))


def _greedy_walk(tokens: list[int], children: list[list[int]], argmax: list[int]) -> tuple[list[int], list[int]]:
    """:func:`verify_greedy_tree` for one request on lists: follow the first child whose token is the target's
    argmax at the current node; returns (accepted nodes, emitted tokens = their tokens + the argmax at the last)."""
    cur = 0
    path: list[int] = []
    while True:
        want = argmax[cur]
        for c in children[cur]:
            if tokens[c] == want:
                break
        else:
            break
        path.append(c)
        cur = c
    return path, [tokens[i] for i in path] + [argmax[cur]]


class Engine:
    def __init__(self, target: TargetModel, drafter: Drafter | None = None, config: EngineConfig | None = None,
                 tokenizer=None) -> None:
        self.target = target
        self.drafter = drafter
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        c = self.config
        self.context_length = c.context_length or min(target.max_positions, 4096)
        if c.num_steps > 0 and drafter is None:
            raise ValueError("num_steps > 0 needs a drafter")
        self.speculative = drafter is not None and c.num_steps > 0
        self.max_tree_nodes = max(c.num_draft_tokens or 0, c.topk * c.num_steps + 1) if self.speculative else 1
        self.cache = target.new_cache(c.max_batch_size, self.context_length + self.max_tree_nodes + 1)
        self.waiting: list[RequestState] = []
        self.running: list[RequestState] = []  # running[i].slot == i
        self._ids = itertools.count()
        self.totals = {"steps": 0, "draft_s": 0.0, "verify_s": 0.0, "prefill_s": 0.0, "tokens": 0}
        self.last_step = StepStats()
        self.last_result: StepResult | None = None
        self._shapes: dict[tuple, _TreeShape] = {}
        self.policy = c.policy if self.speculative else None
        #: online adaptation (``sglang_ext.online.OnlineLearning``): captures committed positions, hot-swaps the
        #: drafter between steps; set with :meth:`attach_online`
        self.online = None
        self._decision: Decision | None = None

    # ---- requests --------------------------------------------------------------------------------------
    def validate(self, req: GenerationRequest) -> None:
        if not req.prompt_ids:
            raise RequestError("prompt: empty prompt (need at least one token)")
        if req.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens: must be >= 1, got {req.max_new_tokens}")
        k = req.top_logprobs
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs: must be an integer in [0, {MAX_TOP_LOGPROBS}], got {k!r}")
        vocab = self.target.vocab_size
        bad = [t for t in req.prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise RequestError(f"prompt: token id {bad[0]} outside the vocabulary [0, {vocab})")
        need = len(req.prompt_ids) + req.max_new_tokens
        if need > self.context_length:
            # blame the prompt only when it leaves no room at all; otherwise the limit asked for is too large
            field = "prompt" if len(req.prompt_ids) >= self.context_length else "max_new_tokens"
            raise RequestError(f"{field}: {len(req.prompt_ids)} prompt tokens + max_new_tokens {req.max_new_tokens} = "
                               f"{need} exceeds the context length {self.context_length}")
        if req.stop and self.tokenizer is None:
            raise RequestError("stop: stop strings need an engine with a tokenizer")

    def add_request(self, req: GenerationRequest, on_tokens=None) -> RequestState:
        self.validate(req)
        rid = req.rid or f"req-{next(self._ids)}"
        state = RequestState(request=req, rid=rid, rng=TorchRandomSource(req.seed), t_arrival=time.perf_counter(),
                             on_tokens=on_tokens)
        self.waiting.append(state)
        return state

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, rid: str) -> bool:
        for s in list(self.waiting):
            if s.rid == rid:
                self.waiting.remove(s)
                self._finish(s, {"type": "abort"}, release=False)
                return True
        for s in list(self.running):
            if s.rid == rid:
                self._finish(s, {"type": "abort"})
                self._compact()
                return True
        return False

    def attach_online(self, online) -> None:
        """Learn from live traffic: ``online`` (an :class:`sglang_ext.online.OnlineLearning`) gets the target's
        features of committed positions only (prefill and accepted paths; no extra target forward), and a newly
        deployed drafter is swapped in at the start of a step, so every step drafts and verifies with one version."""
        if online is not None and not (self.drafter is not None and self.drafter.needs_features):
            raise ValueError("online adaptation needs a feature drafter (EAGLE)")
        self.online = online

    # ---- the step ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestState]:
        """One iteration: admit + prefill, then one (speculative) decode step. Returns requests finished now."""
        if self.online is not None:
            new_model = self.online.poll()  # between steps only: never mid-verify
            if new_model is not None:
                self.drafter.swap_model(new_model)
        stats = StepStats()
        done: list[RequestState] = []
        self._admit(stats)
        if self.running:
            done = self._decode(stats)
        self.last_step = stats
        self.totals["steps"] += 1
        return done

    def run(self, requests: Sequence[GenerationRequest]) -> list[RequestState]:
        states = [self.add_request(r) for r in requests]
        while self.has_work():
            self.step()
        return states

    def _admit(self, stats: StepStats) -> None:
        t0 = time.perf_counter()
        while self.waiting and len(self.running) < self.config.max_batch_size:
            state = self.waiting.pop(0)
            state.slot = len(self.running)
            self.running.append(state)
            self.cache.reset(state.slot)
            if self.drafter is not None:
                self.drafter.admit(state.slot)
            if self.policy is not None:
                self.policy.admit(state.rid)
            self._prefill(state, stats)
        stats.prefill_seconds = time.perf_counter() - t0
        self.totals["prefill_s"] += stats.prefill_seconds

    def _prefill(self, state: RequestState, stats: StepStats) -> None:
        """Write K/V for ``prompt[:-1]`` (chunked); the prompt's last token is the first decode step's root."""
        ids = state.request.prompt_ids
        body = ids[:-1]
        chunk = self.config.prefill_chunk
        want_features = self.drafter is not None and self.drafter.needs_features
        for start in range(0, len(body), chunk):
            piece = body[start:start + chunk]
            T = len(piece)
            out = self.target.forward(
                self.cache, torch.tensor([piece]), torch.ones(T, T, dtype=torch.bool).tril().unsqueeze(0),
                torch.arange(T).unsqueeze(0), logits_for=torch.zeros(1, T, dtype=torch.bool), first_slot=state.slot,
            )
            self.cache.commit(state.slot, list(range(T)))
            if want_features:
                self.drafter.observe(state.slot, out.features[0], ids[start + 1:start + 1 + T])
            if self.online is not None:
                self.online.capture(state.rid, torch.tensor(piece), out.features[0])
            stats.prefill_tokens += T

    def _num_steps(self, state: RequestState) -> int:
        """This step's draft depth for ``state``: the policy's choice (if any), capped by ``num_steps`` and by the
        tokens the request may still emit (a step always emits one more than it accepts)."""
        if not self.speculative:
            return 0
        if len(state.tokens) < 2 and self.drafter.needs_features:
            return 0  # a one-token prompt: the feature drafter has no (hidden state, token) pair to start from yet
        k = self.config.num_steps
        if self._decision is not None:
            k = min(k, self._decision.lengths.get(state.rid, k)) if self._decision.speculate else 0
        left = state.request.max_new_tokens - len(state.output_ids)
        return max(0, min(k, left - 1))

    def _draft(self) -> list[Draft]:
        """One draft per running request (a bare root when speculation is off), trimmed to its step budget."""
        running = self.running
        steps = [self._num_steps(s) for s in running]
        if not any(steps):  # speculation off (or switched off by the policy this step): bare roots, no drafter call
            return [Draft.chain(_last_token(s), []) for s in running]
        want_q = self.policy is not None and getattr(self.policy, "needs_kl", False)
        reqs = [DraftRequest(slot=s.slot, tokens=s.tokens, num_steps=k, greedy=s.request.sampling.greedy,
                             generator=s.rng.generator, want_q=want_q) for s, k in zip(running, steps)]
        drafts = self.drafter.draft(reqs)
        for d, s in zip(drafts, running):  # a chain drafter may not trim to a per-request length itself
            k = self._num_steps(s)
            if self.config.topk == 1 and d.num_nodes - 1 > k:
                d.tokens, d.parents = d.tokens[:k + 1], d.parents[:k + 1]
                if d.draft_probs is not None:
                    d.draft_probs = d.draft_probs[:k + 1]
        return drafts

    def _decode(self, stats: StepStats) -> list[RequestState]:
        running = self.running
        B = len(running)
        t0 = time.perf_counter()
        if self.policy is not None:
            self._decision = self.policy.decide(BatchView(
                rids=[s.rid for s in running], context_lens=[len(s.tokens) for s in running],
                temperatures=[s.request.sampling.temperature for s in running]))
        if hasattr(self.drafter, "last_catch_up_seconds"):
            self.drafter.last_catch_up_seconds = 0.0  # set again only if the drafter runs this step
        drafts = self._draft()
        t1 = time.perf_counter()
        stats.catch_up_seconds = getattr(self.drafter, "last_catch_up_seconds", 0.0)
        if self.config.fast_paths:
            results, out = self._forward_verify_fast(drafts)
        else:
            results, out = self._forward_verify_general(drafts)
        want_features = self.drafter is not None and self.drafter.needs_features
        finished: list[RequestState] = []
        now = time.perf_counter()
        for b, (state, d, (path, emitted)) in enumerate(zip(running, drafts, results)):
            n = d.num_nodes
            keep = [0] + path
            self.cache.commit(state.slot, keep)
            if want_features:
                a = len(path)
                prefix = a == 0 or path[-1] == a  # nodes 1..a in order (always for a chain): a view, no gather
                self.drafter.observe(state.slot, out.features[b, :a + 1] if prefix else out.features[b, keep], emitted)
            if self.online is not None:
                self.online.capture(state.rid, torch.tensor([d.tokens[j] for j in keep]), out.features[b, keep],
                                    out.logits[b, keep], draft_correct_for_step(len(path), keep[-1] in d.parents[1:]))
            if self.speculative:
                state.accept_record.append(len(path))
                state.drafter_versions.add(getattr(self.drafter, "version", 0))
                state.spec_verify_ct += 1
                state.spec_num_correct_drafts += len(path)
                state.spec_num_proposed_drafts += n - 1
                hist = state.spec_correct_drafts_histogram
                while len(hist) <= len(path):
                    hist.append(0)
                hist[len(path)] += 1
            stats.nodes_per_request.append(n)
            stats.accepted_per_request.append(len(path))
            if state.t_first_token is None:
                state.t_first_token = now
            lps = self._logprobs(state, out.logits[b], keep, emitted) if (
                state.request.logprobs or state.request.top_logprobs) else None
            if self._append(state, emitted, lps):
                finished.append(state)
        t2 = time.perf_counter()
        stats.batch_size = B
        stats.draft_seconds, stats.verify_seconds = t1 - t0, t2 - t1
        if self.policy is not None:
            self.last_result = self._step_result(running, drafts, results, out, stats)
            self.policy.observe(self.last_result)
        self.totals["draft_s"] += stats.draft_seconds
        self.totals["verify_s"] += stats.verify_seconds
        for state in finished:
            self._finish(state, state.finish_reason)
        if finished:
            self._compact()
        return finished

    def _step_result(self, running: list[RequestState], drafts: list[Draft], results, out, stats: StepStats) -> StepResult:
        """The step as the policies see it (:class:`StepResult`), with DSDE's KL(p || q) per proposed position when
        the drafter recorded q (``Draft.proposal_probs``): row ``i`` of q proposed node ``i + 1``, whose target
        distribution is the (processed) target distribution at node ``i``."""
        from sglang_ext.core.signals import entropy, kl_divergence

        steps = []
        for b, (state, d, (path, _)) in enumerate(zip(running, drafts, results)):
            depth = max(self._tree_shape(d.parents, d.num_nodes).depths)  # the chain length k for a chain
            kl: list[float] = []
            ent_p: list[float] = []
            ent_q: list[float] = []
            q = d.proposal_probs
            if q is not None and len(q):
                k = q.shape[0]
                sp = state.request.sampling
                logits = out.logits[b:b + 1, :k]
                p = (torch.softmax(logits.float(), dim=-1) if sp.greedy else process_logits(logits, sp, [state.rid]))[0]
                p, q = p.float(), q.to(p.device).float()
                kl, ent_p, ent_q = kl_divergence(p, q).tolist(), entropy(p).tolist(), entropy(q).tolist()
            steps.append(RequestStep(rid=state.rid, proposed=depth, accepted=len(path), kl=kl, target_entropy=ent_p,
                                     draft_entropy=ent_q, context_len=len(state.tokens),
                                     temperature=state.request.sampling.temperature))
        d = self._decision
        return StepResult(requests=steps, speculated=any(s.proposed for s in steps),
                          draft_seconds=stats.draft_seconds - stats.catch_up_seconds,
                          catch_up_seconds=stats.catch_up_seconds, verify_seconds=stats.verify_seconds,
                          verify_tokens=len(drafts) * max(x.num_nodes for x in drafts),
                          drafter=getattr(self.drafter, "name", ""),
                          config={"tree_budget": d.tree_budget, "drafter": d.drafter, **d.info} if d else {})

    def _verify_stochastic(self, b: int, state: RequestState, d: Draft, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """Lossless verification of one sampled request with its own generator (the core's tree rule)."""
        tree = d.as_tree()
        tree.request_ids = [state.rid]
        p = process_logits(logits[b:b + 1, :d.num_nodes], state.request.sampling, [state.rid])
        result = verify_tree(tree, p, state.rng)
        return result.accepted_nodes[0], result.emitted[0]

    def _forward_verify_general(self, drafts: list[Draft]):
        """Reference path: a :class:`DraftTree` per request, the core's tree verifiers, tensor masks per node."""
        running = self.running
        B = len(running)
        N = max(d.num_nodes for d in drafts)
        input_ids = torch.zeros(B, N, dtype=torch.long)
        visible = torch.eye(N, dtype=torch.bool).repeat(B, 1, 1)
        depths = torch.zeros(B, N, dtype=torch.long)
        trees = []
        for b, d in enumerate(drafts):
            tree = d.as_tree()
            tree.request_ids = [running[b].rid]
            trees.append(tree)
            n = d.num_nodes
            input_ids[b, :n] = torch.tensor(d.tokens)
            visible[b, :n, :n] = tree.attention_mask[0]
            depths[b, :n] = tree.depths[0]
        out = self.target.forward(self.cache, input_ids, visible, depths)
        check_finite(out.logits, [s.rid for s in running])
        results = []
        for b, (state, d, tree) in enumerate(zip(running, drafts, trees)):
            logits = out.logits[b:b + 1, :d.num_nodes]
            sp = state.request.sampling
            if sp.greedy:
                result = verify_greedy_tree(tree, logits.argmax(dim=-1))
            else:
                result = verify_tree(tree, process_logits(logits, sp, [state.rid]), state.rng)
            results.append((result.accepted_nodes[0], result.emitted[0]))
        return results, out

    def _forward_verify_fast(self, drafts: list[Draft]):
        """Same inputs and verdicts as :meth:`_forward_verify_general` without per-step tree objects.

        Tree shapes (depths, children, visibility) come from a per-shape cache (a chain of length k is always
        the same shape), the batch tensors are built from lists in one call each, and greedy rows are verified by
        walking the argmax of the whole batch, fetched with one sync. Sampled rows use the core's tree verifier
        unchanged (so each consumes its generator exactly as before).
        """
        running = self.running
        B = len(running)
        N = max(d.num_nodes for d in drafts)
        shapes = [self._tree_shape(d.parents, N) for d in drafts]
        input_ids = torch.tensor([d.tokens + [0] * (N - d.num_nodes) for d in drafts], dtype=torch.long)
        visible = torch.stack([sh.visible for sh in shapes]) if B > 1 else shapes[0].visible.unsqueeze(0)
        depths = torch.tensor([sh.depths for sh in shapes], dtype=torch.long)
        out = self.target.forward(self.cache, input_ids, visible, depths)
        # a finite sum means every entry is finite (a NaN or ±inf anywhere makes it non-finite), so the full check
        # (which names the request) runs only when something may be off: one pass instead of five
        if not math.isfinite(float(out.logits.sum())):
            check_finite(out.logits, [s.rid for s in running])
        greedy_argmax = None
        if any(s.request.sampling.greedy for s in running):
            greedy_argmax = out.logits.argmax(dim=-1).tolist()  # [B][N], one sync for the batch
        results = []
        for b, (state, d, sh) in enumerate(zip(running, drafts, shapes)):
            if state.request.sampling.greedy:
                results.append(_greedy_walk(d.tokens, sh.children, greedy_argmax[b]))
            else:
                results.append(self._verify_stochastic(b, state, d, out.logits))
        return results, out

    def _tree_shape(self, parents: list[int], width: int) -> "_TreeShape":
        """Depths, children and the ``[width, width]`` visibility of one draft's tree shape (cached per shape)."""
        key = (tuple(parents), width)
        shape = self._shapes.get(key)
        if shape is None:
            if len(self._shapes) >= 4096:
                self._shapes.clear()
            shape = self._shapes[key] = _TreeShape.build(parents, width)
        return shape

    # ---- commit / finish ------------------------------------------------------------------------------
    def _logprobs(self, state: RequestState, logits: torch.Tensor, keep: list[int], emitted: list[int]
                  ) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
        """Logprobs (:func:`token_logprobs`) of this step's emitted tokens, and their top lists when asked for.

        ``logits`` is the request's ``[N, V]`` rows; emitted token ``i`` is predicted at node ``keep[i]``. Only the
        rows ``_append`` can still use (``max_new_tokens`` left) are computed: one log_softmax, one sync."""
        req = state.request
        m = min(len(emitted), req.max_new_tokens - len(state.output_ids))
        lp = token_logprobs(logits[keep[:m]], req.sampling)
        picked = lp.gather(1, torch.tensor(emitted[:m], device=lp.device).unsqueeze(1)).squeeze(1).tolist()
        return picked, (_top_logprobs(lp, req.top_logprobs) if req.top_logprobs > 0 else None)

    def _append(self, state: RequestState, tokens: list[int],
                logprobs: tuple[list[float], list[list[tuple[int, float]]] | None] | None = None) -> bool:
        """Append committed tokens, honouring max_new_tokens, EOS/stop ids and stop strings; True if finished.

        ``logprobs`` (from :meth:`_logprobs`, for requests that asked) are appended with their tokens, in the same
        loop, so the records stay aligned with ``output_ids`` whatever truncates ``tokens``."""
        req = state.request
        stop_ids = set(req.stop_token_ids) | (set() if req.ignore_eos else set(self.config.eos_token_ids))
        new: list[int] = []
        reason = None
        for i, tok in enumerate(tokens):
            new.append(tok)
            state.output_ids.append(tok)
            if logprobs is not None:
                state.output_token_logprobs.append(logprobs[0][i])
                if logprobs[1] is not None:
                    state.output_top_logprobs.append(logprobs[1][i])
            if tok in stop_ids:
                reason = {"type": "stop", "matched": tok}
                break
            if len(state.output_ids) >= req.max_new_tokens:
                reason = {"type": "length", "length": req.max_new_tokens}
                break
        self.totals["tokens"] += len(new)
        if req.stop and self.tokenizer is not None and self._stop_in_tail(state, len(new)):
            text = self.tokenizer.decode(state.output_ids, skip_special_tokens=True)  # once, at the hit
            hits = [(text.find(s), s) for s in req.stop if s and s in text]
            if hits:
                pos, s = min(hits)
                state.text = text[:pos]
                reason = {"type": "stop", "matched": s}
        if state.on_tokens is not None and new:
            state.on_tokens(state, new)
        if reason is not None:
            state.finish_reason = reason
            return True
        return False

    def _stop_in_tail(self, state: RequestState, num_new: int) -> bool:
        """Could a stop string have appeared with the last ``num_new`` tokens? Decodes only a tail window (so a long
        generation costs O(new tokens) per step, not a decode of the whole output): every token yields at least
        one character except partial UTF-8 pieces, so a stop string of ``L`` characters ending in the new tokens lies
        within the last ``num_new + L + 4`` tokens."""
        longest = max(len(s) for s in state.request.stop)
        tail = state.output_ids[-(num_new + longest + 4):]
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        return any(s and s in text for s in state.request.stop)

    def _finish(self, state: RequestState, reason: dict | None, release: bool = True) -> None:
        state.finished = True
        state.finish_reason = reason
        state.t_finish = time.perf_counter()
        if state.text is None and self.tokenizer is not None:
            state.text = self.tokenizer.decode(state.output_ids, skip_special_tokens=True)
        if self.policy is not None:
            self.policy.release(state.rid)
        if self.online is not None:
            proposed = state.spec_num_proposed_drafts
            self.online.finish_request(state.rid, state.spec_num_correct_drafts / proposed if proposed else None)
        if release and state.slot >= 0:
            self.cache.reset(state.slot)
            if self.drafter is not None:
                self.drafter.release(state.slot)
            state.slot = -1
        if state.on_tokens is not None:
            state.on_tokens(state, [])

    def _compact(self) -> None:
        """Move live requests down into the holes finished ones left, so they occupy slots ``0..B-1``."""
        live = [s for s in self.running if not s.finished]
        for new_slot, state in enumerate(live):
            if state.slot != new_slot:
                self.cache.move(state.slot, new_slot)
                if self.drafter is not None:
                    self.drafter.move(state.slot, new_slot)
                state.slot = new_slot
        self.running = live
