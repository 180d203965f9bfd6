"""A training job's ``output_dir``: one writer at a time, and the temporaries of dead writers removed.

Rank 0 holds an exclusive ``flock`` on ``OUTPUT_DIR/.lock`` for the whole job, so a second training
pointed at the same folder stops at once with a one-line error instead of pruning the first one's
checkpoints. The lock dies with its process (kill -9 included), so whatever temporaries are found
once it is held (``.tmp-final-*`` model copies, ``.latest.*.tmp``, half-written checkpoints) belong
to dead writers and are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from dvd.config import ConfigError
from dvd.train.distributed import DistEnv, all_true

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
CHECKPOINTS = "checkpoints"


def is_temporary(name: str) -> bool:
    """Names dvd's writers give their temporaries (atomic files, export and checkpoint folders)."""
    return name.startswith(".") and (
        name.endswith(".tmp") or name.startswith(".tmp-") or name.startswith(".old-")
    )


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporaries in ``directory`` and its ``checkpoints/``; returns what was removed.

    Call it only while holding the folder's lock: then no live writer owns any of them.
    """
    removed = []
    for folder in (Path(directory), Path(directory) / CHECKPOINTS):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not is_temporary(path.name):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("%s: removed %d temporaries a killed run left", directory, len(removed))
    return removed


def _lock(directory: Path) -> int:
    """Open and flock ``directory/.lock`` without waiting; the open descriptor holds the lock."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"output_dir {directory} is a file; give a folder path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"output_dir {directory}: a parent is a file; give another path") from None
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"output_dir {directory} is being written by another training (pid {holder}); "
            "wait for it to finish or choose another output_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def claim_output_dir(directory: str | Path, env: DistEnv) -> Iterator[None]:
    """Hold ``directory`` for this job (rank 0 locks it; every rank fails together if it cannot)."""
    directory = Path(directory)
    fd, error = None, None
    if env.is_main:
        try:
            fd = _lock(directory)
        except ConfigError as caught:
            error = caught
    if not all_true(error is None, env):
        raise error or ConfigError(f"output_dir {directory} is held by another training; see rank 0")
    try:
        if fd is not None:
            remove_stale_temporaries(directory)
        yield
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
