"""Launch real SGLang 0.5.23 on a CPU-only machine with the PyTorch stand-in kernels (a TEST harness).

:class:`SGLangCPUServer` starts ``python -m sglang.launch_server`` in its own process group with
:func:`harness_env`, waits for ``/health``, offers :meth:`SGLangCPUServer.generate` over HTTP ``/generate`` and
always tears the whole group down (on exit, on exceptions, and at interpreter exit). :func:`run_engine` drives the
offline ``sglang.Engine`` the same way, in a child interpreter (the Engine spawns processes, so it needs a
``__main__`` guard; see :mod:`.engine_runner`).

Results measured through this harness are "SGLang control flow with PyTorch stand-in kernels", not SGLang CPU
performance (see ``stand_in/common_ops.py``).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

STAND_IN_DIR = Path(__file__).resolve().parent / "stand_in"
ENV_FLAG = "SGLANG_EXT_CPU_STANDIN"

# Why each flag: CPU engine + the only CPU attention backend that handles speculative verify; overlap scheduling
# and CUDA graphs do not apply on CPU; a small KV pool (without it SGLang sizes the pool from free RAM, ~13 GB);
# float32 so that plain and speculative greedy decoding are token-identical (bf16 near-ties flip).
DEFAULT_SERVER_ARGS: tuple[str, ...] = (
    "--device", "cpu",
    "--attention-backend", "intel_amx",
    "--disable-overlap-schedule",
    "--disable-cuda-graph",
    "--max-total-tokens", "16384",
    "--max-running-requests", "8",
    "--dtype", "float32",
)

# The same defaults as ``sglang.Engine`` keyword arguments.
DEFAULT_ENGINE_KWARGS: dict[str, Any] = {
    "device": "cpu",
    "attention_backend": "intel_amx",
    "disable_overlap_schedule": True,
    "disable_cuda_graph": True,
    "max_total_tokens": 16384,
    "max_running_requests": 8,
    "dtype": "float32",
}


class ServerStartError(RuntimeError):
    """The SGLang server exited or did not become healthy in time; the message carries the log's tail."""


def harness_env(base: Optional[Mapping[str, str]] = None, *, cpu_ids: str = "0") -> dict[str, str]:
    """Environment for an SGLang process that should use the stand-in kernels.

    ``SGLANG_USE_CPU_ENGINE=1`` selects the CPU engine; ``SGLANG_CPU_OMP_THREADS_BIND`` (default one core, "0")
    sizes the scheduler's compute threads -- one thread is several times faster than two on a busy 2-core box;
    ``SGLANG_EXT_CPU_STANDIN=1`` arms ``stand_in/sitecustomize.py``; ``PYTHONPATH`` gets the stand-in directory
    first so ``sgl_kernel`` finds ``common_ops`` and Python finds the ``sitecustomize``.
    """
    env = dict(os.environ if base is None else base)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_ids
    env[ENV_FLAG] = "1"
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(STAND_IN_DIR)]
    env["PYTHONPATH"] = os.pathsep.join([str(STAND_IN_DIR), *rest])
    return env


def merge_args(defaults: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """``defaults`` with every ``--flag`` that ``overrides`` names (and that flag's values) replaced by the override.

    A flag's values are the tokens after it up to the next ``--`` token, so ``--dtype bfloat16`` replaces the
    default ``--dtype float32`` and ``--speculative-algorithm NGRAM`` is simply appended.
    """

    def split(args: Sequence[str]) -> list[tuple[str, list[str]]]:
        groups: list[tuple[str, list[str]]] = []
        for token in args:
            if token.startswith("--") or not groups:
                name, eq, value = token.partition("=")
                groups.append((name, [value] if eq else []))
            else:
                groups[-1][1].append(token)
        return groups

    override_groups = split([str(a) for a in overrides])
    named = {name for name, _ in override_groups}
    out: list[str] = []
    for name, values in [g for g in split([str(a) for a in defaults]) if g[0] not in named] + override_groups:
        out += [name, *values]
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the server binds it shortly after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tail(path: Union[str, Path], lines: int = 60) -> str:
    """The last ``lines`` lines of a log file ('' if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``grace`` seconds."""
    if proc.poll() is None or _group_alive(proc.pid):
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and (proc.poll() is None or _group_alive(proc.pid)):
                time.sleep(0.2)
            if proc.poll() is not None and not _group_alive(proc.pid):
                break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether any process is still in group ``pgid`` (children the server spawned outlive its main process)."""
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


@dataclass
class GenerateResult:
    """One completion from ``/generate``: decoded text, generated token ids, and SGLang's ``meta_info``."""

    text: str
    output_ids: list[int]
    meta_info: dict[str, Any] = field(default_factory=dict)


class SGLangCPUServer:
    """A real SGLang HTTP server on CPU with the stand-in kernels; use as a context manager.

    ``extra_args`` are appended to (and override) :data:`DEFAULT_SERVER_ARGS`, e.g.
    ``SGLangCPUServer(model, "--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "4")``.
    ``env`` is the base environment (default ``os.environ``) that :func:`harness_env` extends. The server log goes
    to ``log_path`` (default a fresh file under the temp dir, kept after exit for post-mortems).
    """

    def __init__(self, model_path: Union[str, Path], *extra_args: str, env: Optional[Mapping[str, str]] = None,
                 port: Optional[int] = None, timeout: float = 600.0, host: str = "127.0.0.1",
                 log_path: Optional[Union[str, Path]] = None, cpu_ids: str = "0") -> None:
        self.model_path = str(model_path)
        self.extra_args = [str(a) for a in extra_args]
        self.env = harness_env(env, cpu_ids=cpu_ids)
        self.host = host
        self.port = port
        self.timeout = timeout
        self.log_path = Path(log_path) if log_path else None
        self.proc: Optional[subprocess.Popen] = None
        self.startup_seconds: Optional[float] = None
        self._log_file = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("SGLangCPUServer.base_url: the server has not been started")
        return f"http://{self.host}:{self.port}"

    #: flags every launch starts from (``extra_args`` override them)
    default_args: tuple[str, ...] = DEFAULT_SERVER_ARGS

    def command(self) -> list[str]:
        """The full ``launch_server`` command line (the port must be chosen first)."""
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
                "--host", self.host, "--port", str(self.port), *merge_args(self.default_args, self.extra_args)]

    def start(self) -> "SGLangCPUServer":
        """Launch and block until ``/health`` answers 200; raises :class:`ServerStartError` with the log tail."""
        if self.proc is not None:
            raise RuntimeError("SGLangCPUServer.start: already started")
        if self.port is None:
            self.port = free_port(self.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"sglang-cpu-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log_file = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        atexit.register(self.stop)
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_healthy(self, t0: float) -> None:
        assert self.proc is not None
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerStartError(f"SGLang server (port {self.port}) exited with code {code} during start-up; "
                                       f"log {self.log_path}, tail:\n{tail(self.log_path)}")
            if self._health_ok():
                return
            if time.monotonic() - t0 > self.timeout:
                raise ServerStartError(f"SGLang server (port {self.port}) not healthy after {self.timeout:.0f} s; "
                                       f"log {self.log_path}, tail:\n{tail(self.log_path)}")
            time.sleep(2.0)

    def _health_ok(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=10) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self) -> None:
        """Terminate the server's whole process group (idempotent)."""
        if self.proc is not None:
            _kill_group(self.proc)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        atexit.unregister(self.stop)

    def __enter__(self) -> "SGLangCPUServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines) if self.log_path else ""

    def post(self, path: str, payload: Mapping[str, Any], timeout: float = 600.0) -> Any:
        """POST JSON to ``path`` and decode the JSON reply; HTTP errors name the path and carry the body."""
        req = urllib.request.Request(self.base_url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", "replace")[:2000]
            raise RuntimeError(f"POST {path} -> HTTP {e.code}: {body}\nserver log tail:\n{self.log_tail(30)}") from e

    def get(self, path: str, timeout: float = 60.0) -> Any:
        return json.loads(self.get_text(path, timeout))

    def get_text(self, path: str, timeout: float = 60.0) -> str:
        """GET ``path`` as text (e.g. ``/metrics``)."""
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as r:
            return r.read().decode("utf-8", "replace")

    def generate(self, prompts: Union[str, Sequence[str], None] = None, *,
                 input_ids: Union[Sequence[int], Sequence[Sequence[int]], None] = None, max_new_tokens: int = 16,
                 temperature: float = 0.0, sampling_params: Optional[Mapping[str, Any]] = None,
                 timeout: float = 600.0, **extra: Any) -> Union[GenerateResult, list[GenerateResult]]:
        """Greedy (by default) completion through ``/generate``.

        Pass ``prompts`` (a string or a list) or ``input_ids`` (a list of ids or a list of lists); a single prompt
        gives one :class:`GenerateResult`, a list gives a list (sent as one batched request). ``sampling_params``
        are merged over ``{"max_new_tokens", "temperature"}``; ``extra`` goes into the request body as is.
        """
        if (prompts is None) == (input_ids is None):
            raise ValueError("SGLangCPUServer.generate: pass exactly one of prompts or input_ids")
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, **(sampling_params or {})}
        payload: dict[str, Any] = {"sampling_params": params, **extra}
        if prompts is not None:
            single = isinstance(prompts, str)
            payload["text"] = prompts if single else list(prompts)
        else:
            single = bool(input_ids) and isinstance(input_ids[0], int)
            payload["input_ids"] = list(input_ids) if single else [list(x) for x in input_ids]
        reply = self.post("/generate", payload, timeout=timeout)
        items = [reply] if isinstance(reply, dict) else reply
        results = [GenerateResult(text=r.get("text", ""), output_ids=list(r.get("output_ids") or []),
                                  meta_info=r.get("meta_info", {})) for r in items]
        return results[0] if single else results


class SGLangGPUServer(SGLangCPUServer):
    """The same launcher on a CUDA machine with SGLang's real kernels: no stand-in, no CPU engine.

    float32 (as on the CPU) so that greedy outputs of plain and speculative decoding can be compared token for
    token; CUDA graphs stay on (SGLang's default) so the adaptive runtime states are the ones a deployment uses.
    """

    default_args = ("--dtype", "float32", "--max-running-requests", "8", "--mem-fraction-static", "0.6")

    def __init__(self, model_path: Union[str, Path], *extra_args: str, env: Optional[Mapping[str, str]] = None,
                 **kwargs: Any) -> None:
        super().__init__(model_path, *extra_args, env=env, **kwargs)
        self.env = dict(os.environ if env is None else env)


def run_engine(model_path: Union[str, Path], prompts: Union[Sequence[str], None] = None, *,
               input_ids: Optional[Sequence[Sequence[int]]] = None,
               sampling_params: Optional[Mapping[str, Any]] = None, engine_kwargs: Optional[Mapping[str, Any]] = None,
               env: Optional[Mapping[str, str]] = None, timeout: float = 900.0,
               log_path: Optional[Union[str, Path]] = None) -> list[dict[str, Any]]:
    """Run the offline ``sglang.Engine`` in a child interpreter with :func:`harness_env`; return its outputs.

    ``engine_kwargs`` override :data:`DEFAULT_ENGINE_KWARGS` (e.g. ``speculative_algorithm="NGRAM"``). Each output
    is the Engine's dict (``text``, ``output_ids``, ``meta_info``). The child runs in its own process group, which
    is killed on timeout or error; its log is kept at ``log_path`` (or a temp file) and its tail is in any error.
    """
    if (prompts is None) == (input_ids is None):
        raise ValueError("run_engine: pass exactly one of prompts or input_ids")
    work = Path(tempfile.mkdtemp(prefix="sglang-cpu-engine-"))
    spec = {
        "model_path": str(model_path),
        "prompts": None if prompts is None else list(prompts),
        "input_ids": None if input_ids is None else [list(x) for x in input_ids],
        "sampling_params": {"max_new_tokens": 16, "temperature": 0.0, **(sampling_params or {})},
        "engine_kwargs": {**DEFAULT_ENGINE_KWARGS, **(engine_kwargs or {})},
        "output_path": str(work / "outputs.json"),
    }
    (work / "spec.json").write_text(json.dumps(spec))
    log = Path(log_path) if log_path else work / "engine.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "sglang_ext.testing.sglang_cpu.engine_runner",
                                 str(work / "spec.json")], stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=harness_env(env), start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise RuntimeError(f"run_engine: sglang.Engine did not finish in {timeout:.0f} s; log {log}, tail:\n"
                               f"{tail(log)}") from None
        finally:
            _kill_group(proc, grace=5.0)
    out = Path(spec["output_path"])
    if code != 0 or not out.is_file():
        raise RuntimeError(f"run_engine: engine runner exited with code {code}; log {log}, tail:\n{tail(log)}")
    return json.loads(out.read_text())
