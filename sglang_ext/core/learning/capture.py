r"""Capture of served traffic for online drafter training (TIDE §2.1: reuse the target's own hidden states).

What is stored, per committed position ``t`` of a request (one *row*):

* ``tokens[t]``: the token at position ``t``;
* ``features[t]``: the target feature at that position (its chosen layers' outputs, concatenated), in a compact
  dtype (bf16 by default);
* the target's next-token distribution there (the distribution of ``tokens[t+1]``), as its top-k ids and
  log-probabilities (float16), or nothing (a prefill row: the engine computes no logits there);
* ``draft_correct[t]``: whether the drafter had proposed ``tokens[t+1]`` correctly (1), wrongly (0), or
  nothing / unknown (-1). Used for OSD-style re-weighting (§6.1).

This is exactly :func:`sglang_ext.training.drafter.ttt_loss`'s alignment: its ``features[:, t]`` is the feature at
position ``t``, ``tokens[:, t]`` the token there and ``logp[:, t]`` the distribution of the token at ``t + 1``
(index ``i`` of the unrolled drafter pairs ``(h_i, x_{i+1})`` and is trained on ``logp[i+1]``).

Cost on the serving path: the engine already has the features and logits of the committed positions; ``add``
takes a top-k over the logit rows on their device, then copies ``n x (F + 2k)`` small values to host memory
(one device-to-host copy per request per step, ``~2F + 12k`` bytes per committed token: 3.5 KB at F = 1728).
Everything else (training, batching, eviction bookkeeping) happens on host copies, off the serving path.

Memory: a hard byte budget over every stored tensor (closed samples and open runs). When a new chunk does not
fit, the oldest closed samples are evicted first, then the oldest open run is truncated from its front (it stays
contiguous). A request's rows form an open *run*; ``finish(rid)`` (or reaching ``max_sample_len`` rows) closes
it into a :class:`CapturedSample`, a contiguous token sequence.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from sglang_ext.core.buckets import length_buckets
from sglang_ext.core.policies.base import Param

PARAMS: tuple[Param, ...] = (
    Param("capture_bytes", 256 * 2**20, 2**16, 2**40, kind="int",
          doc="byte budget of the capture buffer (all stored tensors; ~3.5 KB per token at F = 1728)"),
    Param("capture_topk", 8, 1, 1024, kind="int", doc="target distribution entries kept per position"),
    Param("capture_max_sample_len", 512, 8, 1_000_000, kind="int", doc="rows per sample (longer requests are split)"),
)

#: log-probability given to draft-vocabulary entries outside the kept top-k mass. ``exp`` of it is exactly 0 in
#: float32 (so the soft label puts no mass there) while staying finite, so ``0 * logp`` is 0 and not NaN in
#: ``ttt_loss``'s KL metric (an ``-inf`` would turn every row's entropy into NaN).
LOGP_FLOOR = -1.0e4


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class CapturedSample:
    """One contiguous run of committed positions of one request (all tensors on CPU)."""

    rid: str
    tokens: torch.Tensor  # [n] int32
    features: torch.Tensor  # [n, F] compact dtype
    topk_ids: torch.Tensor  # [n, k] int32 (rows without a distribution: zeros)
    topk_logp: torch.Tensor  # [n, k] float16, sorted descending
    has_dist: torch.Tensor  # [n] bool: the row carries the target's distribution
    draft_correct: torch.Tensor  # [n] int8: 1 right, 0 wrong, -1 unknown
    seq: int = 0  # capture order (oldest first)
    alpha: float | None = None  # the request's measured acceptance rate (TIDE's per-request α), set at finish

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in self._tensors())

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.tokens, self.features, self.topk_ids, self.topk_logp, self.has_dist, self.draft_correct

    def slice(self, start: int, stop: int | None = None) -> CapturedSample:
        """Rows ``start:stop`` as a new sample with its own (compact) storage."""
        s = slice(start, stop)
        t = [x[s].clone() for x in self._tensors()]
        return CapturedSample(self.rid, *t, seq=self.seq, alpha=self.alpha)

    @staticmethod
    def concat(parts: Sequence[CapturedSample]) -> CapturedSample:
        if len(parts) == 1:
            return parts[0]
        cols = list(zip(*(p._tensors() for p in parts)))
        return CapturedSample(parts[0].rid, *(torch.cat(c, dim=0) for c in cols), seq=parts[0].seq, alpha=parts[0].alpha)


@dataclass
class _Run:
    """An open run: chunks appended in order, truncatable from the front."""

    rid: str
    seq: int
    chunks: deque = field(default_factory=deque)
    rows: int = 0
    nbytes: int = 0

    def append(self, c: CapturedSample) -> None:
        self.chunks.append(c)
        self.rows += len(c)
        self.nbytes += c.nbytes

    def drop_front(self, n_rows: int) -> tuple[int, int]:
        """Drop up to ``n_rows`` oldest rows; return (rows dropped, bytes freed)."""
        dropped = freed = 0
        while self.chunks and dropped < n_rows:
            c = self.chunks[0]
            take = min(len(c), n_rows - dropped)
            if take == len(c):
                self.chunks.popleft()
                freed += c.nbytes
            else:
                rest = c.slice(take)
                freed += c.nbytes - rest.nbytes
                self.chunks[0] = rest
            dropped += take
        self.rows -= dropped
        self.nbytes -= freed
        return dropped, freed

    def take_front(self, n_rows: int) -> CapturedSample:
        """Remove and return the first ``n_rows`` rows as one sample."""
        parts, got = [], 0
        while got < n_rows:
            c = self.chunks[0]
            take = min(len(c), n_rows - got)
            if take == len(c):
                parts.append(self.chunks.popleft())
            else:
                parts.append(c.slice(0, take))
                self.chunks[0] = c.slice(take)
            got += take
        out = CapturedSample.concat(parts)
        out.seq = self.seq
        self.rows -= n_rows
        self.nbytes = sum(c.nbytes for c in self.chunks)
        return out


class CaptureBuffer:
    """Bounded host buffer of committed positions, grouped into contiguous per-request samples.

    The engine calls :meth:`add` once per request per step (committed positions only, in order), and
    :meth:`finish` when the request ends; the online trainer takes closed samples with :meth:`drain`.
    """

    def __init__(self, byte_budget: int, topk: int = 8, feature_dtype: torch.dtype = torch.bfloat16,
                 max_sample_len: int = 512, min_sample_len: int = 3) -> None:
        if byte_budget <= 0:
            raise ValueError(f"byte_budget must be > 0, got {byte_budget}")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.byte_budget = int(byte_budget)
        self.topk = int(topk)
        self.feature_dtype = feature_dtype
        self.max_sample_len = int(max_sample_len)
        self.min_sample_len = int(min_sample_len)  # ttt_loss needs 3 tokens for one training pair
        self._closed: deque[CapturedSample] = deque()
        self._open: OrderedDict[str, _Run] = OrderedDict()  # creation order = age
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._bytes = 0
        self._closed_tokens = 0
        self.evicted_tokens = 0  # rows lost to the byte budget
        self.dropped_tokens = 0  # rows of runs closed below min_sample_len (or discarded)
        self.feature_dim: int | None = None

    # ---- accounting ---------------------------------------------------------------------------------
    @property
    def bytes_used(self) -> int:
        return self._bytes

    @property
    def num_samples(self) -> int:
        """Closed samples ready for :meth:`drain`."""
        return len(self._closed)

    @property
    def closed_tokens(self) -> int:
        return self._closed_tokens

    @property
    def num_tokens(self) -> int:
        """Rows stored, closed samples and open runs together."""
        return self._closed_tokens + sum(r.rows for r in self._open.values())

    def samples(self) -> Iterator[CapturedSample]:
        """The closed samples, oldest first (read-only view)."""
        return iter(list(self._closed))

    # ---- the engine's side ---------------------------------------------------------------------------
    def add(self, rid: str, tokens: torch.Tensor, features: torch.Tensor,
            target_logits_or_logp: torch.Tensor | None = None, draft_correct: torch.Tensor | None = None) -> None:
        """Append committed rows ``tokens [n]``, ``features [n, F]``, next-token logits or log-probs ``[n, V]``.

        Logits and log-probs give the same stored values: ``logp_topk = topk(x) - logsumexp(x)`` (the
        logsumexp of a log-prob row is 0). ``None`` (prefill) stores no distribution: training then uses the
        committed next token as a hard label. ``draft_correct [n]`` (bool): row ``i``'s next token was drafted
        correctly; None: unknown.
        """
        n = int(tokens.shape[0])
        if n == 0:
            return
        if features.dim() != 2 or features.shape[0] != n:
            raise ValueError(f"{rid}: features {tuple(features.shape)} must be [n={n}, F]")
        if self.feature_dim is None:
            self.feature_dim = int(features.shape[1])
        elif features.shape[1] != self.feature_dim:
            raise ValueError(f"{rid}: feature width {features.shape[1]} != {self.feature_dim} of earlier rows")
        k = self.topk
        with torch.no_grad():
            if target_logits_or_logp is not None:
                x = target_logits_or_logp.detach()
                if x.shape[0] != n:
                    raise ValueError(f"{rid}: {x.shape[0]} distribution rows for {n} tokens")
                kk = min(k, x.shape[-1])
                vals, ids = x.topk(kk, dim=-1)
                lp = (vals.float() - torch.logsumexp(x.float(), dim=-1, keepdim=True)).to(torch.float16).cpu()
                ids = ids.to(torch.int32).cpu()
                if kk < k:
                    lp = torch.cat([lp, torch.full((n, k - kk), float("-inf"), dtype=torch.float16)], dim=1)
                    ids = torch.cat([ids, torch.zeros(n, k - kk, dtype=torch.int32)], dim=1)
                has = torch.ones(n, dtype=torch.bool)
            else:
                lp = torch.full((n, k), float("-inf"), dtype=torch.float16)
                ids = torch.zeros(n, k, dtype=torch.int32)
                has = torch.zeros(n, dtype=torch.bool)
            feats = features.detach().to(self.feature_dtype).cpu()  # cast on the device first: a smaller copy
            if feats.data_ptr() == features.data_ptr() or not feats.is_contiguous():
                feats = feats.contiguous().clone()  # never alias (or keep alive) the engine's tensor
            toks = tokens.detach().to(torch.int32).cpu().reshape(n)
            dc = (torch.full((n,), -1, dtype=torch.int8) if draft_correct is None
                  else draft_correct.detach().to(torch.int8).cpu().reshape(n))
        chunk = CapturedSample(rid, toks, feats, ids, lp, has, dc)
        with self._lock:
            self._add_locked(rid, chunk)

    def finish(self, rid: str, alpha: float | None = None) -> CapturedSample | None:
        """Close ``rid``'s open run into a sample (the request ended); returns it, or None if nothing was kept."""
        with self._lock:
            run = self._open.pop(rid, None)
            if run is None:
                return None
            return self._close_locked(run, run.rows, alpha)

    def discard(self, rid: str) -> int:
        """Drop ``rid``'s open run (e.g. collection was paused when it ended); returns the rows dropped."""
        with self._lock:
            run = self._open.pop(rid, None)
            if run is None:
                return 0
            self._bytes -= run.nbytes
            self.dropped_tokens += run.rows
            return run.rows

    # ---- the trainer's side --------------------------------------------------------------------------
    def drain(self, n_tokens: int | None = None) -> list[CapturedSample]:
        """Remove and return closed samples, oldest first, until they hold ``>= n_tokens`` rows (None: all)."""
        out: list[CapturedSample] = []
        got = 0
        with self._lock:
            while self._closed and (n_tokens is None or got < n_tokens):
                s = self._closed.popleft()
                self._bytes -= s.nbytes
                self._closed_tokens -= len(s)
                got += len(s)
                out.append(s)
        return out

    # ---- internals (lock held) -----------------------------------------------------------------------
    def _add_locked(self, rid: str, chunk: CapturedSample) -> None:
        row_bytes = chunk.nbytes // len(chunk)
        if chunk.nbytes > self.byte_budget:  # keep the newest rows that fit; the older part of this run is gone
            fit = self.byte_budget // row_bytes
            self.evicted_tokens += len(chunk) - fit
            old = self._open.pop(rid, None)
            if old is not None:
                self._bytes -= old.nbytes
                self.evicted_tokens += old.rows
            if fit == 0:
                return
            chunk = chunk.slice(len(chunk) - fit)
        self._make_room(chunk.nbytes)
        run = self._open.get(rid)
        if run is None:
            run = self._open[rid] = _Run(rid, next(self._seq))
        run.append(chunk)
        self._bytes += chunk.nbytes
        while run.rows >= self.max_sample_len:  # a long request becomes several contiguous samples
            self._bytes -= run.nbytes
            part = run.take_front(self.max_sample_len)
            self._bytes += run.nbytes + part.nbytes
            self._push_closed(part)
            if run.rows:  # the rest is a new, younger run
                run.seq = next(self._seq)
                self._open.move_to_end(rid)
        if run.rows == 0:
            self._open.pop(rid, None)

    def _make_room(self, need: int) -> None:
        """Evict oldest closed samples, then truncate the oldest open runs, until ``need`` more bytes fit."""
        while self._bytes + need > self.byte_budget and self._closed:
            s = self._closed.popleft()
            self._bytes -= s.nbytes
            self._closed_tokens -= len(s)
            self.evicted_tokens += len(s)
        for rid in list(self._open):
            over = self._bytes + need - self.byte_budget
            if over <= 0:
                break
            run = self._open[rid]
            row_bytes = max(1, run.nbytes // max(1, run.rows))
            dropped, freed = run.drop_front(-(-over // row_bytes))
            self._bytes -= freed
            self.evicted_tokens += dropped
            if run.rows == 0:
                del self._open[rid]

    def _close_locked(self, run: _Run, n_rows: int, alpha: float | None) -> CapturedSample | None:
        if n_rows < self.min_sample_len:
            self._bytes -= run.nbytes
            self.dropped_tokens += run.rows
            return None
        self._bytes -= run.nbytes
        sample = run.take_front(n_rows)
        sample.alpha = alpha
        self._bytes += sample.nbytes
        self._push_closed(sample)
        return sample

    def _push_closed(self, sample: CapturedSample) -> None:
        if len(sample) < self.min_sample_len:
            self._bytes -= sample.nbytes
            self.dropped_tokens += len(sample)
            return
        self._closed.append(sample)
        self._closed_tokens += len(sample)


def draft_correct_for_step(num_accepted: int, drafted_next: bool) -> torch.Tensor:
    """``draft_correct`` for one decode step's committed rows ``[root, accepted_1..accepted_a]``.

    Row ``i < a`` was followed by an accepted draft token (correct). Row ``a`` was followed by the bonus /
    correction token: the draft was wrong there if it had proposed a child of that node (``drafted_next``),
    otherwise it proposed nothing (unknown, -1).
    """
    out = torch.ones(num_accepted + 1, dtype=torch.int8)
    out[-1] = 0 if drafted_next else -1
    return out


# ---- captured samples -> training tensors ------------------------------------------------------------------
@dataclass
class TrainingBatch:
    """Padded training tensors; unpacks as ``tokens, features, logp, valid`` (``ttt_loss``'s inputs).

    ``label_weight [B, S]``: weight of row ``s`` as a *target* (0: no label; > 1: OSD up-weighting of rows
    the draft got wrong). ``target_top1 [B, S]``: the target's top-1 token id (full vocabulary) at row ``s``,
    -1 without a label. ``num_tokens``: real rows.
    """

    tokens: torch.Tensor  # [B, S] long
    features: torch.Tensor  # [B, S, F]
    logp: torch.Tensor  # [B, S, V_d]
    valid: torch.Tensor  # [B, S] bool
    label_weight: torch.Tensor  # [B, S] float32
    target_top1: torch.Tensor  # [B, S] long
    num_tokens: int = 0
    #: [B, S] bool: rows captured while decoding (they carry the target's distribution). Prefill rows are prompt
    #: text the drafter never drafts in serving, so the deploy gate scores chains over generated rows only.
    generated: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.tokens, self.features, self.logp, self.valid))

    def to(self, device: torch.device | str, feature_dtype: torch.dtype | None = None) -> TrainingBatch:
        f = self.features.to(device, feature_dtype) if feature_dtype else self.features.to(device)
        return TrainingBatch(self.tokens.to(device), f, self.logp.to(device), self.valid.to(device),
                             self.label_weight.to(device), self.target_top1.to(device), self.num_tokens,
                             None if self.generated is None else self.generated.to(device))


def to_training_batch(samples: Sequence[CapturedSample], draft_vocab: torch.Tensor, wrong_weight: float = 1.0,
                      feature_dtype: torch.dtype = torch.float32, prefill_weight: float = 1.0,
                      sample_weights: Sequence[float] | None = None) -> TrainingBatch:
    r"""Pad samples into ``ttt_loss`` tensors; the label is the target's top-k mass on the draft vocabulary.

    Row ``s`` with a stored distribution: with ``K`` = its kept ids that are in the draft vocabulary,

    .. math:: \tilde p(v) = \frac{p(v)\,1[v \in K]}{\sum_{u \in K} p(u)}, \qquad \log\tilde p(v) = \text{LOGP\_FLOOR for } v \notin K

    The approximation: the tail beyond the top-k (and outside ``V_d``) is dropped, so the soft label is the
    target's distribution truncated and renormalised. Cross-entropy to it is minimised by ``q = p̃``; for
    greedy acceptance only the argmax matters, and it is kept exactly whenever it lies in ``V_d``. A row with no
    stored distribution (prefill) gets the one-hot of the committed next token (the standard LM label). Rows
    with no kept id in ``V_d`` (or the last row of a prefill-only tail) have no label: ``label_weight`` 0.

    ``wrong_weight`` multiplies the weight of rows the draft got wrong (``draft_correct == 0``; OSD §6.1);
    ``prefill_weight`` the weight of prefill (prompt) rows: serving drafts only after generated tokens, and chat
    prompts repeat (system prompt, template), so full-weight prompt rows teach the drafter to memorise them at the
    expense of what it drafts (measured: analysis/results/workload-shift-*). ``sample_weights[b]`` multiplies
    every row of sample ``b`` (a replay window's ``decay^age``).
    """
    if sample_weights is not None and len(sample_weights) != len(samples):
        raise ValueError(f"to_training_batch: {len(sample_weights)} sample weights for {len(samples)} samples")
    if not samples:
        raise ValueError("to_training_batch: no samples")
    B, S = len(samples), max(len(s) for s in samples)
    F = samples[0].features.shape[1]
    vocab = draft_vocab.to(torch.long).cpu()
    Vd = int(vocab.numel())
    top_id = max(int(vocab.max()), max(int(s.topk_ids.max()) for s in samples), max(int(s.tokens.max()) for s in samples))
    table = torch.full((top_id + 1,), -1, dtype=torch.long)
    table[vocab] = torch.arange(Vd)
    tokens = torch.zeros(B, S, dtype=torch.long)
    feats = torch.zeros(B, S, F, dtype=feature_dtype)
    logp = torch.full((B, S, Vd), LOGP_FLOOR, dtype=torch.float32)
    valid = torch.zeros(B, S, dtype=torch.bool)
    weight = torch.zeros(B, S, dtype=torch.float32)
    top1 = torch.full((B, S), -1, dtype=torch.long)
    generated = torch.zeros(B, S, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = len(s)
        tok = s.tokens.to(torch.long)
        tokens[b, :n] = tok
        feats[b, :n] = s.features.to(feature_dtype)
        valid[b, :n] = True
        has = s.has_dist
        # soft rows: scatter the kept top-k mass onto the draft vocabulary (column Vd collects the rest)
        didx = table[s.topk_ids.to(torch.long)]  # [n, k]
        kept = (didx >= 0) & has.view(n, 1)
        p = torch.where(kept, s.topk_logp.float().exp(), torch.zeros(()))
        mass = torch.zeros(n, Vd + 1).scatter_add_(1, torch.where(kept, didx, torch.full_like(didx, Vd)), p)[:, :Vd]
        z = mass.sum(-1, keepdim=True)
        soft_ok = has & (z.view(n) > 0)
        row_logp = torch.where(mass > 0, (mass / z.clamp(min=1e-30)).log(), torch.full_like(mass, LOGP_FLOOR))
        # hard rows: one-hot of the committed next token
        nxt = torch.full((n,), -1, dtype=torch.long)
        nxt[:-1] = table[tok[1:]]
        hard_ok = ~has & (nxt >= 0)
        hard = torch.full((n, Vd), LOGP_FLOOR)
        rows = hard_ok.nonzero().view(-1)
        hard[rows, nxt[rows]] = 0.0
        logp[b, :n] = torch.where(soft_ok.view(n, 1), row_logp, hard)
        ok = soft_ok | hard_ok
        w = torch.where(s.draft_correct == 0, torch.tensor(float(wrong_weight)), torch.tensor(1.0))
        w = torch.where(has, w, w * float(prefill_weight))
        weight[b, :n] = w * ok * (1.0 if sample_weights is None else float(sample_weights[b]))
        generated[b, :n] = has
        t1 = torch.full((n,), -1, dtype=torch.long)
        t1[soft_ok] = s.topk_ids[soft_ok, 0].to(torch.long)
        hard_tok = torch.cat([tok[1:], tok.new_full((1,), -1)])
        t1[~has] = hard_tok[~has]
        t1[~ok] = -1
        top1[b, :n] = t1
    return TrainingBatch(tokens, feats, logp, valid, weight, top1, num_tokens=sum(len(s) for s in samples),
                         generated=generated)


def batch_samples(samples: Sequence[CapturedSample], batch_tokens: int, draft_vocab: torch.Tensor,
                  wrong_weight: float = 1.0, feature_dtype: torch.dtype = torch.float32,
                  prefill_weight: float = 1.0, sample_weights: Sequence[float] | None = None) -> list[TrainingBatch]:
    """Group samples of similar length (little padding) into batches of ``<= batch_tokens`` padded rows."""
    groups = length_buckets([len(s) for s in samples], batch_tokens)
    return [to_training_batch([samples[i] for i in g], draft_vocab, wrong_weight, feature_dtype, prefill_weight,
                              None if sample_weights is None else [sample_weights[i] for i in g])
            for g in groups]


# ---- packing for inter-process transfer ------------------------------------------------------------------
def pack_samples(samples: Sequence[CapturedSample]) -> dict:
    """A few flat tensors (one shared-memory segment each when sent through a torch queue) plus lengths."""
    cols = list(zip(*(s._tensors() for s in samples)))
    names = ("tokens", "features", "topk_ids", "topk_logp", "has_dist", "draft_correct")
    out = {n: torch.cat(c, dim=0) for n, c in zip(names, cols)}
    out["lengths"] = [len(s) for s in samples]
    out["rids"] = [s.rid for s in samples]
    out["alphas"] = [s.alpha for s in samples]
    out["seqs"] = [s.seq for s in samples]
    return out


def unpack_samples(packed: dict) -> list[CapturedSample]:
    names = ("tokens", "features", "topk_ids", "topk_logp", "has_dist", "draft_correct")
    out, start = [], 0
    for n, rid, a, q in zip(packed["lengths"], packed["rids"], packed["alphas"], packed["seqs"]):
        out.append(CapturedSample(rid, *(packed[k][start:start + n].clone() for k in names), seq=q, alpha=a))
        start += n
    return out


__all__ = ["LOGP_FLOOR", "PARAMS", "CaptureBuffer", "CapturedSample", "TrainingBatch", "batch_samples", "draft_correct_for_step",
           "pack_samples", "to_training_batch", "unpack_samples"]
