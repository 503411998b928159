"""The run directory: atomic writes and the record of finished steps, so Ctrl-C and a re-run resume.

A step's outputs are written to temporary names and renamed into place; only then is the step recorded as done in
``state.json`` (itself replaced atomically). An interrupted step therefore leaves no half-written file under a real
name and is simply run again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .settings import Settings


class RunDirError(RuntimeError):
    pass


def write_atomic(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)
    return path


def write_json(path: Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=1, default=str) + "\n")


class RunDir:
    STATE = "state.json"

    def __init__(self, path: Path, settings: Settings, fresh: bool = False) -> None:
        self.path = Path(path)
        self.settings = settings
        self.path.mkdir(parents=True, exist_ok=True)
        state_file = self.path / self.STATE
        self.state: dict[str, Any] = {"settings": settings.to_json(), "key": settings.key(), "steps": {}}
        if state_file.is_file() and not fresh:
            try:
                old = json.loads(state_file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise RunDirError(f"{state_file}: unreadable ({e}); pass --fresh to start this directory over") from e
            if old.get("key") != settings.key():
                diff = settings.differences(old.get("settings", {}))
                raise RunDirError(f"{self.path} holds a quickstart run with other settings ({'; '.join(diff[:4])}); "
                                  "re-run with the same flags to resume, --fresh to start over, or --out elsewhere")
            self.state = old
        self._save()

    def _save(self) -> None:
        write_json(self.path / self.STATE, self.state)

    def done(self, step: str) -> bool:
        return step in self.state["steps"]

    def mark_done(self, step: str, seconds: float, result: dict[str, Any]) -> None:
        write_json(self.path / f"step-{step}.json", result)
        self.state["steps"][step] = {"seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                     "result": f"step-{step}.json"}
        self._save()

    def result(self, step: str) -> dict[str, Any]:
        if not self.done(step):
            raise RunDirError(f"step {step!r} has not run in {self.path}; run it first (--steps {step})")
        return json.loads((self.path / f"step-{step}.json").read_text())

    def timings(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in self.state["steps"].items()}
