"""The decoupled online trainer (TIDE §2.1): a child process that trains rounds; a supervisor in the server.

Server side (:class:`OnlineTrainer`)::

    trainer = OnlineTrainer(handoff_dir, target_embed, target_lm_head, initial_model=drafter_model, config=...)
    trainer.start()                       # publishes v1 = the serving drafter if the directory is empty
    trainer.submit_round(samples)         # non-blocking: a torch.multiprocessing queue (spawn context)
    v = trainer.poll()                    # per engine step: new deployed version number, or None
    trainer.status()                      # for logs and /metrics
    trainer.stop()

Child (:func:`_child_main`): loads the latest version from the hand-off directory and binds it to the target's
embedding and LM head, passed *once* at start as shared-memory tensors (the target is never reloaded); per
round: split off a held-back slice, run the learner, gate the candidate against the current drafter, publish
if better, report a small result message. It runs ``trainer_threads`` torch threads (default 1) so it does
not starve serving.

Faults: a round that raises is reported as an error (the learner's state is rolled back). A child that dies
(crash, OOM kill, SIGKILL) is noticed by the next :meth:`OnlineTrainer.poll`, logged, counted, and restarted
with fresh queues (the old ones are closed and their semaphores freed at once); the round in flight is dropped,
and serving keeps the last good version, since only complete versions are ever published. Learner state
(momentum, Hedge experts) lives in the child and restarts with it; the drafter weights do not (the new child
loads the latest version).

Shutdown: :meth:`OnlineTrainer.stop` is idempotent, bounded in time (``timeout`` for the child to finish its
round and exit, then SIGTERM, then SIGKILL) and safe to call from another thread than the one that polls. It
releases everything *before* it returns: the child is joined, both queues are closed, their feeder threads
joined and their POSIX semaphores unlinked. Nothing is left for interpreter exit, which matters because
uvicorn re-raises SIGTERM after its shutdown: the server then dies by the signal, no ``atexit`` handler runs,
and semaphores left to multiprocessing's exit-time finalizers were reported by the resource tracker as
"leaked semaphore objects". The child ignores SIGINT (a terminal's Ctrl-C reaches the whole process group; the
server stops the child itself) and exits on its own when the server process is gone.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import queue
import select
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from sglang_ext.core.drafters.checkpoint import FeatureDraftModel
from sglang_ext.core.learning import gate, learners
from sglang_ext.core.learning import replay as replay_window
from sglang_ext.core.learning.capture import (
    CapturedSample,
    batch_samples,
    pack_samples,
    unpack_samples,
)
from sglang_ext.core.learning.control import resolve
from sglang_ext.core.learning.gate import DeployGate, GateResult, split_eval
from sglang_ext.core.learning.handoff import (
    latest_version,
    load_version,
    prune,
    publish,
)
from sglang_ext.core.learning.learners import Learner, RoundStats, make_learner
from sglang_ext.core.learning.replay import ReplayWindow
from sglang_ext.core.policies.base import Param

log = logging.getLogger("sglang_ext.online")

PARAMS: tuple[Param, ...] = (
    Param("trainer_threads", 1, 1, 256, kind="int", doc="torch threads of the trainer process (serving keeps the rest)"),
    Param("trainer_nice", 10, 0, 19, kind="int",
          doc="niceness the trainer process gives itself: where it shares cores with serving, serving goes first"),
    Param("keep_versions", 4, 1, 10_000, kind="int", doc="drafter versions kept in the hand-off directory"),
)

#: every tunable of the trainer process, in one place (learner, gate, process)
TRAINER_PARAMS: tuple[Param, ...] = learners.PARAMS + replay_window.PARAMS + gate.PARAMS + PARAMS


def train_round(current: FeatureDraftModel, samples: Sequence[CapturedSample], learner: Learner, deploy_gate: DeployGate,
                config: dict[str, Any], round_index: int = 0, replay: ReplayWindow | None = None
                ) -> tuple[FeatureDraftModel, RoundStats, GateResult]:
    """One round, in process: hold back a slice, train on the rest, gate the candidate against ``current``.

    With a ``replay`` window the learner trains on the window's past training rows (weighted ``decay^age``) and
    this round's; the held-back slice is always this round's only, and this round's training rows join the
    window afterwards, whatever the verdict. Calls ``learner.commit()`` if the gate deploys and
    ``learner.rollback()`` otherwise.
    """
    train, held = split_eval(samples, config["eval_fraction"], seed=config["seed"] * 7919 + round_index)
    vocab = current.draft_vocab.cpu()
    fresh = train
    weights = None
    if replay is not None:
        train, weights = replay.training_set(fresh)
    train_batches = batch_samples(train, config["batch_tokens"], vocab, config["wrong_weight"],
                                  prefill_weight=config.get("prefill_weight", 1.0), sample_weights=weights)
    eval_batches = batch_samples(held, config["batch_tokens"], vocab)
    candidate, stats = learner.round(current, train_batches)
    result = deploy_gate.decide(current, candidate, eval_batches)
    if result.deploy:
        learner.commit()
    else:
        learner.rollback()
    if replay is not None:
        replay.add(fresh)
        stats.extra["replay_tokens"] = replay.tokens
    alphas = [s.alpha for s in fresh if s.alpha is not None]
    stats.extra["alpha_train"] = sum(alphas) / len(alphas) if alphas else None  # Algorithm 1's ᾱ_train (reported)
    return candidate, stats, result


def _cpu_seconds() -> float:
    return time.process_time()


#: how often an idle child checks that the server process is still there (it exits when it is gone)
PARENT_CHECK_S = 1.0


def _child_main(handoff_dir: str, config: dict, embed: torch.Tensor, lm_head: torch.Tensor, expect_target: dict | None,
                requests, results, round_delay_s: float) -> None:
    # Ctrl-C in a terminal signals the whole process group: the server shuts down and stops this process itself
    # (a KeyboardInterrupt here would only print a traceback and kill the round). SIGTERM keeps its default.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _unblock_sigint()
    parent = mp.parent_process()
    nice = int(config.get("trainer_nice", 0))
    if nice > 0:
        try:
            os.nice(nice)  # training is off the critical path: it should take idle CPU, not serving's
        except OSError:
            pass
    torch.set_num_threads(int(config["trainer_threads"]))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(config["seed"])
    learner = make_learner(config)
    deploy_gate = DeployGate(config)
    replay = ReplayWindow.from_config(config)
    current: FeatureDraftModel | None = None
    version: int | None = None
    results.put({"type": "ready", "pid": os.getpid(), "cpu": _cpu_seconds()})
    while True:
        try:
            msg = requests.get(timeout=PARENT_CHECK_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                break  # the server was killed without stopping us: nobody will read a result again
            continue
        if msg is None:
            break
        round_id, packed = msg
        results.put({"type": "started", "round": round_id, "cpu": _cpu_seconds()})
        t0 = time.perf_counter()
        try:
            if round_delay_s:
                time.sleep(round_delay_s)  # fault-injection hook (tests kill the child here)
            samples = unpack_samples(packed)
            del packed
            v = latest_version(handoff_dir)
            if v is None:
                raise RuntimeError(f"{handoff_dir}: no drafter version to train from")
            if v != version:
                current = load_version(handoff_dir, v, expect_target).to(embed.device).bind_target(embed, lm_head).eval()
                version = v
            candidate, stats, res = train_round(current, samples, learner, deploy_gate, config, round_id, replay)
            new_version, parent_version = None, version  # not ``parent``: that is the server process
            if res.deploy:
                new_version = publish(candidate, handoff_dir, extra={"online": {"round": round_id, "parent": version,
                                                                               "gate": res.as_dict()}})
                prune(handoff_dir, keep=int(config["keep_versions"]))
                current, version = candidate, new_version
            results.put({"type": "result", "round": round_id, "outcome": res.outcome, "deploy": res.deploy,
                         "version": new_version, "parent": parent_version,
                         "gate": res.as_dict(), "learner": stats.as_dict(), "samples": len(samples),
                         "tokens": sum(len(s) for s in samples), "seconds": time.perf_counter() - t0,
                         "cpu": _cpu_seconds()})
        except Exception as e:  # noqa: BLE001  (a bad round must not kill the trainer)
            learner.rollback()
            results.put({"type": "error", "round": round_id, "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc(), "cpu": _cpu_seconds()})


def _proc_cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a live process from /proc (Linux); None elsewhere."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _block_sigint() -> bool:
    """Block SIGINT in this thread while a child is spawned, so the child starts with it blocked (inherited across
    fork and exec) and a Ctrl-C during its imports cannot interrupt them; True if it was blocked here."""
    if not hasattr(signal, "pthread_sigmask"):
        return False
    try:
        return signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    except (OSError, ValueError):
        return False


def _unblock_sigint() -> None:
    if hasattr(signal, "pthread_sigmask"):
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        except (OSError, ValueError):
            pass


def _unblock_feeder(q, feeder: threading.Thread, end: float) -> None:
    """Empty ``q``'s pipe until its feeder thread exits or ``end`` (monotonic) passes. Only for a queue whose
    consumer is dead: its feeder can then be blocked for ever on a full pipe (a message larger than the pipe's
    buffer). Raw reads through our own duplicate of the read end: a consumer killed mid-message leaves no frame
    boundary, and the feeder may close the queue's descriptor once it is through."""
    try:
        fd = os.dup(q._reader.fileno())  # the feeder is blocked in a write: it is not closing the reader now
    except (AttributeError, OSError, ValueError):
        return
    try:
        while feeder.is_alive() and time.monotonic() < end:
            if select.select([fd], [], [], 0.02)[0] and not os.read(fd, 1 << 20):
                feeder.join(0.02)  # end of file: the feeder closed its ends and is exiting
    except (OSError, ValueError):
        pass
    finally:
        os.close(fd)


def _release_queue(q, timeout: float) -> bool:
    """Close a multiprocessing queue whose consumer is gone, and wait at most ``timeout`` s for its feeder thread.

    Once the last reference to it is dropped its three semaphores are unlinked there and then (refcounting);
    nothing is left to interpreter exit. True if the queue was fully released; False if its feeder thread is
    still stuck (it is then detached, so that exit does not wait on it).
    """
    try:
        q.close()
    except (OSError, ValueError):
        pass
    feeder = getattr(q, "_thread", None)  # CPython's multiprocessing.queues.Queue: None until the first put()
    if feeder is not None:
        end = time.monotonic() + timeout
        feeder.join(min(0.1, timeout))  # with room in the pipe it flushes and exits at once
        if feeder.is_alive():
            _unblock_feeder(q, feeder, end)
        if feeder.is_alive():
            q.cancel_join_thread()
            return False
    try:
        q.join_thread()  # returns at once (the feeder has exited); drops the exit-time join
    except (AssertionError, OSError, ValueError):
        pass
    return True


def _end_process(proc, timeout: float, grace: float = 1.0) -> int | None:
    """Join ``proc`` for ``timeout`` s, then SIGTERM it, then SIGKILL it (``grace`` s each); its exit code."""
    proc.join(max(0.0, timeout))
    if proc.is_alive():
        proc.terminate()
        proc.join(grace)
    if proc.is_alive():
        proc.kill()
        proc.join(grace)
    code = proc.exitcode
    if code is not None:
        try:
            proc.close()  # its sentinel fd
        except ValueError:
            pass
    return code


def _semaphores_freed(refs: list[weakref.ref]) -> bool:
    """True once every queue in ``refs`` was collected (its semaphores unlinked); one gc pass for cycles."""
    if any(r() is not None for r in refs):
        gc.collect()
    return all(r() is None for r in refs)


class OnlineTrainer:
    """Supervisor of the trainer process (see the module docstring).

    Call :meth:`submit_round`, :meth:`poll` and :meth:`take_results` from one thread (the engine's);
    :meth:`stop` and :meth:`status` may come from another (the server's shutdown, /metrics): the lifecycle
    and both queues are behind one lock.
    """

    def __init__(self, handoff_dir: str | Path, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                 initial_model: FeatureDraftModel | None = None, config: dict[str, Any] | None = None,
                 expect_target: dict | None = None, round_delay_s: float = 0.0) -> None:
        self.handoff_dir = str(handoff_dir)
        self.config = resolve(TRAINER_PARAMS, config, "online trainer")
        self.expect_target = expect_target
        self.round_delay_s = round_delay_s
        self._embed = embed_weight.detach()
        self._lm_head = lm_head_weight.detach()
        for t in (self._embed, self._lm_head):
            if t.device.type == "cpu":
                t.share_memory_()  # once: every (re)started child maps the same pages
        self._initial = initial_model
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._requests = self._results = None
        self._ids = itertools.count(1)
        self._in_flight: dict[int, int] = {}  # round id -> tokens
        self._stopping = False
        self._seen_version: int | None = None
        self._cpu_dead = 0.0  # CPU seconds of children that exited
        self._cpu_last = 0.0  # last CPU reading of the current child
        self._new_results: list[dict] = []
        self._ready = False
        self._lock = threading.RLock()
        self.stats = {"restarts": 0, "rounds_submitted": 0, "rounds": 0, "deployed": 0, "rejected": 0, "errors": 0,
                      "dropped_rounds": 0, "last_started": None, "last_error": None, "last_round": None}

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> OnlineTrainer:
        with self._lock:
            if self._proc is not None:
                return self
            if latest_version(self.handoff_dir) is None:
                if self._initial is None:
                    raise ValueError(f"{self.handoff_dir}: no published drafter and no initial_model to publish")
                publish(self._initial, self.handoff_dir, extra={"online": {"initial": True}})
            self._seen_version = latest_version(self.handoff_dir)
            self._stopping = False
            self._spawn()
        return self

    def _spawn(self) -> None:
        self._requests, self._results = self._ctx.Queue(), self._ctx.Queue()
        self._cpu_last = 0.0
        self._ready = False  # the child reported "ready" (imports done, waiting for rounds)
        self._proc = self._ctx.Process(
            target=_child_main, name="sglang-ext-online-trainer", daemon=True,
            args=(self.handoff_dir, self.config, self._embed, self._lm_head, self.expect_target,
                  self._requests, self._results, self.round_delay_s))
        blocked = _block_sigint()
        try:
            self._proc.start()
        finally:
            if blocked:
                _unblock_sigint()
        log.info("online trainer started (pid %s, %d thread(s))", self._proc.pid, self.config["trainer_threads"])

    def _release_child(self, timeout: float) -> bool:
        """Take the child and its queues out of the supervisor, end the child (bounded by ``timeout`` + 2 s),
        close both queues and free their semaphores now; True if everything was freed.

        Only this frame holds them afterwards (the Process keeps the queues in its arguments), so dropping them
        here unlinks the semaphores at once instead of leaving them to interpreter exit.
        """
        proc, requests, results = self._proc, self._requests, self._results
        self._proc = self._requests = self._results = None
        code = _end_process(proc, timeout) if proc is not None else None
        del proc
        queues = [q for q in (requests, results) if q is not None]
        del requests, results
        freed = all([_release_queue(q, timeout=2.0) for q in queues])
        refs = [weakref.ref(q) for q in queues]
        del queues
        freed = _semaphores_freed(refs) and freed
        if not freed:
            log.warning("online trainer: the queues of the trainer process (exit code %s) could not all be released",
                        code)
        return freed

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the child and free every resource; idempotent; returns within ``timeout`` + 6 s at worst.

        A round in flight may finish for up to ``timeout`` s (a finished round that deploys is published);
        an idle child exits at once; one still starting up (nothing to lose) is terminated without waiting.
        Whatever is still alive after that is terminated (nothing partial is ever published).
        """
        with self._lock:
            if self._proc is None:
                return
            self._stopping = True
            try:
                self._requests.put(None)
            except (OSError, ValueError):
                pass
            self._drain_results()
            wait = timeout if self._in_flight else min(timeout, 1.0) if self._ready else 0.0
            self._proc.join(max(0.0, wait))
            self._drain_results()  # results sent before it exited (a last deployed round is then seen)
            self._cpu_dead += self._cpu_last
            self._cpu_last = 0.0
            if self._in_flight:
                log.info("online trainer stopped with round(s) %s unfinished", sorted(self._in_flight))
                self._in_flight.clear()
            self._release_child(timeout=0.0)

    def __enter__(self) -> OnlineTrainer:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        proc = self._proc
        try:
            return None if proc is None else proc.pid
        except ValueError:  # closed by a concurrent stop()
            return None

    @property
    def started(self) -> bool:
        return self._proc is not None

    @property
    def alive(self) -> bool:
        proc = self._proc
        try:
            return proc is not None and proc.is_alive()
        except ValueError:  # closed by a concurrent stop()
            return False

    @property
    def ready(self) -> bool:
        """The current child has finished starting up (imports, threads) and waits for rounds."""
        return self._proc is not None and self._ready

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # ---- rounds ----------------------------------------------------------------------------------------------
    def submit_round(self, samples: Sequence[CapturedSample]) -> int:
        """Queue a round for the child (non-blocking); returns its id. Needs >= 2 samples (one is held back)."""
        if len(samples) < 2:
            raise ValueError(f"a round needs at least 2 samples (one is held back for the gate), got {len(samples)}")
        packed = pack_samples(samples)
        with self._lock:
            if self._proc is None:
                raise RuntimeError("online trainer is not started")
            rid = next(self._ids)
            self._in_flight[rid] = sum(len(s) for s in samples)
            self.stats["rounds_submitted"] += 1
            self._requests.put((rid, packed))
        return rid

    def poll(self) -> int | None:
        """Collect results, restart a dead child; return a newly deployed version number (else None). Cheap."""
        with self._lock:
            self._drain_results()
            if self._proc is not None and not self._stopping and not self._proc.is_alive():
                self._on_child_death()
        v = latest_version(self.handoff_dir)
        if v is not None and (self._seen_version is None or v > self._seen_version):
            self._seen_version = v
            return v
        return None

    def take_results(self) -> list[dict]:
        """Round results (``type`` "result" or "error") received since the last call, oldest first."""
        out, self._new_results = self._new_results, []
        return out

    def wait_idle(self, timeout: float) -> bool:
        """Poll until no round is in flight (tests, shutdown); True if idle in time. Versions seen are not lost."""
        end = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < end:
            with self._lock:
                self._drain_results(block_s=0.05)
                if self._proc is not None and not self._stopping and not self._proc.is_alive():
                    self._on_child_death()
        return not self._in_flight

    def _drain_results(self, block_s: float = 0.0) -> None:
        if self._results is None:
            return
        first = True
        while True:
            try:
                msg = self._results.get(timeout=block_s) if (first and block_s) else self._results.get_nowait()
            except (queue.Empty, OSError, ValueError, EOFError):
                return
            first = False
            self._cpu_last = max(self._cpu_last, float(msg.get("cpu", 0.0)))
            kind = msg.get("type")
            if kind == "ready":
                self._ready = True
            elif kind == "started":
                self.stats["last_started"] = msg["round"]
            elif kind == "result":
                self._in_flight.pop(msg["round"], None)
                self.stats["rounds"] += 1
                self.stats["deployed" if msg["deploy"] else "rejected"] += 1
                self.stats["last_round"] = {k: v for k, v in msg.items() if k != "cpu"}
                self._new_results.append(msg)
                g = msg["gate"]
                log.info("online round %d: %s (E[accepted] %.3f -> %.3f%s)", msg["round"], msg["outcome"],
                         g["current_score"], g["candidate_score"], f", v{msg['version']}" if msg["version"] else "")
            elif kind == "error":
                self._in_flight.pop(msg["round"], None)
                self.stats["errors"] += 1
                self.stats["last_error"] = f"round {msg['round']}: {msg['error']}"
                self._new_results.append(msg)
                log.warning("online round %d failed: %s", msg["round"], msg["error"])

    def _on_child_death(self) -> None:
        code = self._proc.exitcode
        dropped = sorted(self._in_flight)
        self.stats["restarts"] += 1
        self.stats["dropped_rounds"] += len(dropped)
        self.stats["last_error"] = f"trainer process exited with code {code}; dropped round(s) {dropped}"
        log.warning("online trainer (pid %s) exited with code %s; restarting (dropped rounds %s)",
                    self._proc.pid, code, dropped)
        self._in_flight.clear()
        self._cpu_dead += self._cpu_last
        self._cpu_last = 0.0
        self._release_child(timeout=0.0)  # the old queues closed and their semaphores freed before new ones
        self._spawn()

    # ---- reporting -----------------------------------------------------------------------------------------
    def trainer_cpu_seconds(self) -> float:
        live = _proc_cpu_seconds(self.pid) if self.alive else None
        if live is not None:
            self._cpu_last = max(self._cpu_last, live)
        return self._cpu_dead + self._cpu_last

    def status(self) -> dict:
        return {"alive": self.alive, "pid": self.pid,
                "version": latest_version(self.handoff_dir), "in_flight": self.in_flight,
                "trainer_cpu_seconds": self.trainer_cpu_seconds(), **self.stats}


__all__ = ["PARAMS", "TRAINER_PARAMS", "OnlineTrainer", "train_round"]
