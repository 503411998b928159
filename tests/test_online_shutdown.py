"""Shutdown of the online trainer on every path: normal stop, stop after the child was killed and restarted, stop
with a round in flight, stop racing the polling (engine) thread, Ctrl-C reaching the trainer's process group, a
server killed outright, and SIGTERM / Ctrl-C of the real ``sglang-ext serve --online-learning``.

"Nothing leaked" is checked where it happens: every POSIX semaphore of the trainer's queues is unlinked (gone from
/dev/shm) as soon as ``stop()`` (or the restart) returns, not at interpreter exit, which a server killed by the
signal uvicorn re-raises never reaches; no child process is left; the server's stderr has no resource-tracker
warning and no traceback.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pytest

from sglang_ext.engine.target import TargetModel
from sglang_ext.models.tiny import tiny_llama
from sglang_ext.online.trainer import OnlineTrainer

from test_online_learning import V, capture, new_drafter, progressions  # noqa: E402  (tests/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
needs_shm = pytest.mark.skipif(not SHM.is_dir() or sys.platform != "linux",
                               reason="named POSIX semaphores are visible under /dev/shm on Linux only")


@pytest.fixture(scope="module")
def target():
    return TargetModel(tiny_llama(vocab_size=V, hidden_size=64, num_layers=3, seed=5), feature_layers=(0, 2))


@pytest.fixture(scope="module")
def samples(target):
    return capture(target, progressions(4, 7, length=12))


def _trainer(target, tmp_path, **kw) -> OnlineTrainer:
    return OnlineTrainer(tmp_path / "handoff", target.embed_tokens.weight, target.lm_head.weight,
                         initial_model=new_drafter(target), config={"trainer_threads": 1}, **kw)


def _semaphores(trainer: OnlineTrainer) -> list[Path]:
    """The /dev/shm files of the current queues' semaphores (3 per queue: reader lock, writer lock, bound)."""
    out = []
    for q in (trainer._requests, trainer._results):
        for lock in (q._rlock, q._wlock, q._sem):
            out.append(SHM / ("sem." + lock._semlock.name.lstrip("/")))
    return out


def _wait(cond, timeout: float, poll=None, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out: {what}"
        if poll is not None:
            poll()
        time.sleep(0.02)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _assert_no_children() -> None:
    assert multiprocessing.active_children() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("QueueFeederThread")]


# ---- the supervisor, from parts (tiny model, no server) ------------------------------------------------------
@needs_shm
def test_stop_after_a_kill_and_respawn_frees_old_and_new_queues(target, samples, tmp_path):
    """A killed child is restarted with fresh queues: the old ones are closed and their semaphores unlinked at the
    restart (even with a feeder thread blocked on a full pipe); stop() then frees the new ones, leaves no process
    or feeder thread, and a second stop() is a no-op."""
    tr = _trainer(target, tmp_path, round_delay_s=30.0).start()
    try:
        old_pid, old_sems = tr.pid, _semaphores(tr)
        old_queues = [weakref.ref(tr._requests), weakref.ref(tr._results)]
        assert all(p.exists() for p in old_sems)
        tr.submit_round(samples)  # the old request queue has a feeder thread and a round in its pipe
        tr._requests.put(b"\0" * (4 << 20))  # more than a pipe holds: its feeder blocks once the child is dead
        os.kill(old_pid, signal.SIGKILL)
        t0 = time.monotonic()
        _wait(lambda: tr.stats["restarts"] == 1, 10, tr.poll, "restart")
        assert time.monotonic() - t0 < 3.0
        assert tr.pid != old_pid and tr.status()["alive"] and tr.stats["dropped_rounds"] == 1
        assert not any(p.exists() for p in old_sems), "the killed child's queues kept their semaphores"
        assert all(q() is None for q in old_queues)  # closed, feeder joined, and dropped: nothing left for exit
        new_pid, new_sems = tr.pid, _semaphores(tr)
        assert all(p.exists() for p in new_sems)
    finally:
        t0 = time.monotonic()
        tr.stop()
        stop_s = time.monotonic() - t0
    assert stop_s < 5.0
    assert not any(p.exists() for p in new_sems)
    assert _gone(old_pid) and _gone(new_pid) and not tr.status()["alive"] and tr.pid is None
    _assert_no_children()
    t0 = time.monotonic()
    tr.stop()  # idempotent
    assert time.monotonic() - t0 < 0.1 and tr.status()["alive"] is False


@needs_shm
def test_stop_with_a_round_in_flight_is_bounded(target, samples, tmp_path):
    """The child is inside a (30 s) round: stop(timeout) gives it that long, then terminates it; nothing leaks."""
    tr = _trainer(target, tmp_path, round_delay_s=30.0).start()
    pid, sems = tr.pid, _semaphores(tr)
    tr.submit_round(samples)
    _wait(lambda: tr.stats["last_started"] == 1, 60, tr.poll, "the round to start")
    t0 = time.monotonic()
    tr.stop(timeout=0.5)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.5 + 3.0, elapsed  # timeout, then SIGTERM (the child dies at once), then the queues
    assert tr.in_flight == 0 and _gone(pid) and not any(p.exists() for p in sems)
    _assert_no_children()


@needs_shm
def test_stop_from_another_thread_while_the_engine_thread_polls_and_submits(target, samples, tmp_path):
    """The server's shutdown calls stop() while the engine thread may still poll and submit: no error there, no
    respawn after the stop, nothing left behind."""
    tr = _trainer(target, tmp_path).start()
    sems = _semaphores(tr)
    errors: list[BaseException] = []
    halt = threading.Event()

    def engine_loop() -> None:
        try:
            while not halt.is_set():
                tr.poll()
                tr.take_results()
                if tr.started and not tr.in_flight:
                    try:
                        tr.submit_round(samples)
                    except RuntimeError:
                        assert not tr.started  # only "not started": stopped between the check and the submit
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    _wait(lambda: tr.ready, 60, tr.poll, "the child to start")
    th = threading.Thread(target=engine_loop)
    th.start()
    try:
        _wait(lambda: tr.stats["rounds"] >= 1, 60, what="a round")
        tr.stop(timeout=2.0)
        time.sleep(0.3)  # the engine thread keeps polling a stopped trainer
    finally:
        halt.set()
        th.join(10)
    assert not errors, errors
    assert not tr.started and tr.stats["restarts"] == 0
    assert not any(p.exists() for p in sems)
    _assert_no_children()


def test_ctrl_c_reaches_the_server_not_the_trainer(target, tmp_path):
    """A terminal's Ctrl-C signals the whole process group: the trainer ignores it, during start-up (SIGINT is blocked
    while it is spawned) and after; the server stops it itself."""
    tr = _trainer(target, tmp_path).start()
    try:
        pid = tr.pid
        os.kill(pid, signal.SIGINT)  # while it is still importing
        _wait(lambda: tr.ready, 60, tr.poll, "the child to start")
        os.kill(pid, signal.SIGINT)
        time.sleep(0.5)
        tr.poll()
        assert tr.status()["alive"] and tr.pid == pid and tr.stats["restarts"] == 0
    finally:
        tr.stop()
    _assert_no_children()


def test_the_trainer_exits_when_the_server_is_killed(tmp_path):
    """A server killed outright (SIGKILL: no stop(), no atexit) does not leave its trainer behind."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]  # this checkout's package, whatever is installed
        from test_online_shutdown import _trainer, TargetModel, tiny_llama, V
        from pathlib import Path
        if __name__ == "__main__":
            target = TargetModel(tiny_llama(vocab_size=V, hidden_size=64, num_layers=3, seed=5), feature_layers=(0, 2))
            tr = _trainer(target, Path({str(tmp_path)!r}))
            tr.start()
            while not tr.ready:
                tr.poll()
                time.sleep(0.05)
            print(tr.pid, flush=True)
            time.sleep(600)
    """)
    path = tmp_path / "server.py"
    path.write_text(script)
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        child = int(proc.stdout.readline())
        proc.kill()
        proc.wait(10)
        _wait(lambda: _gone(child) or _zombie(child), 10, what="the orphaned trainer to exit")
    finally:
        if proc.poll() is None:
            proc.kill()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# ---- the real server ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(port: int, path: str, body: dict | None = None) -> str:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", None if body is None else json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read().decode()


def _metric(port: int, name: str) -> float:
    for line in _http(port, "/metrics").splitlines():
        if line.startswith(f"sglang_ext:online_{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric sglang_ext:online_{name}")


#: uvicorn (>= 0.29) re-raises the SIGTERM/SIGINT it handled once its shutdown is complete, so the server's status
#: is "killed by that signal" (-15 / Ctrl-C: KeyboardInterrupt, exit 130) unless the server swallows it (then 0)
CLEAN_EXIT = {signal.SIGTERM: (0, -signal.SIGTERM), signal.SIGINT: (0, 130, -signal.SIGINT)}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c-to-the-group"])
def test_serve_with_online_learning_shuts_down_clean(sig, tmp_path):
    """`sglang-ext serve` (SmolLM2-135M + the shipped EAGLE drafter, --online-learning) trains a round, then gets
    SIGTERM (or Ctrl-C, i.e. SIGINT to its whole process group): it exits in time, with no leaked-semaphore warning,
    no traceback, and its trainer gone."""
    from conftest import require_model

    require_model("smollm2-135m")
    port = _free_port()
    err_path = tmp_path / "stderr.log"
    cmd = [sys.executable, "-m", "sglang_ext", "serve", "--port", str(port), "--speculative-algorithm", "EAGLE",
           "--speculative-draft-model-path", str(REPO / "drafters" / "smollm2-135m-eagle"), "--online-learning",
           "--online-handoff-dir", str(tmp_path / "handoff"), "--online-n-init", "1", "--online-n-threshold", "16",
           "--online-gate-margin", "-10", "--max-running-requests", "2", "--context-length", "512",
           "--shutdown-timeout", "2"]
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, err_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not become healthy"
            try:
                _http(port, "/health")
                break
            except OSError:
                time.sleep(0.2)
        deadline = time.monotonic() + 60
        i = 0
        while _metric(port, "rounds") < 1:  # each request's steps poll the trainer: keep serving until a round is in
            assert time.monotonic() < deadline, f"no training round: {_http(port, '/metrics')[-2000:]}"
            _http(port, "/v1/completions", {"prompt": f"Count with me: one two three {i}", "max_tokens": 16,
                                            "temperature": 0})
            i += 1
        assert _metric(port, "alive") == 1.0
        children = _descendants(proc.pid)  # the trainer and multiprocessing's resource tracker
        assert len(children) >= 2, children
        t0 = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C does: the trainer gets it too
        else:
            proc.send_signal(sig)
        rc = proc.wait(30)
        exit_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = err_path.read_text()
    assert rc in CLEAN_EXIT[sig], (rc, text[-3000:])
    assert exit_s < 15.0, exit_s
    assert "leaked semaphore" not in text and "resource_tracker" not in text, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    _wait(lambda: all(_gone(p) or _zombie(p) for p in children), 5, what=f"the server's children {children} to exit")


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    out, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parents.items() if p in frontier]
        out += kids
        frontier = kids
    return out

