"""Small, safe file I/O: atomic writes and the provenance written beside every result."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def _writer() -> str:
    """This process as named in its temporaries: host and pid (a killed writer's are found by the next)."""
    return f"{re.sub(r'[^A-Za-z0-9]', '_', socket.gethostname())}-{os.getpid()}"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then fsync and rename onto ``path``: readers see old or new, never half.

    The temporary is ``.NAME.HOST-PID.XXXXXXXX.tmp`` beside ``path``, so that one left by a killed process
    can be told from one being written (:func:`remove_dead_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode open() would
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def remove_dead_temporaries(directory: str | Path, name: str | None = None) -> list[Path]:
    """Delete the :func:`atomic_write` temporaries in ``directory`` (of file ``name``, or of any file) whose
    writer process, on this host, no longer runs. Returns what was removed."""
    host, _ = _writer().rsplit("-", 1)
    pattern = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        match = pattern.match(path.name)
        if match is None or match["host"] != host or (name is not None and match["name"] != name):
            continue
        if not _alive(int(match["pid"])) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | Path) -> Any:
    """Read JSON with a one-line error naming the file if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON ({error.msg} at line {error.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: malformed JSON (not UTF-8 text)") from None
    except (ValueError, RecursionError) as error:  # e.g. integers past the digit limit, deep nesting
        raise ValueError(f"{path}: malformed JSON ({str(error).splitlines()[0][:80]})") from None


def git_revision() -> str | None:
    """The source tree's git revision, or None outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str | None]:
    """Package versions and git revision, written next to every checkpoint and result."""
    info: dict[str, str | None] = {"python": platform.python_version(), "git": git_revision()}
    for name in ("dvd", "torch", "open_clip_torch", "transformers", "webdataset"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    info["argv"] = " ".join(sys.argv)
    return info
