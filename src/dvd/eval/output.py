"""The results file on disk: its path checked before any work, writers serialised, dead runs' litter removed.

Each read-merge-replace of ``R.json`` holds an exclusive lock on the hidden file ``.R.json.lock`` beside
it, so concurrent evaluations into one file never lose rows. Every file is written atomically through a
temporary named after its writer (host and pid, see :func:`dvd.io.atomic_write`); an evaluation starting
on ``R.json`` removes the temporaries of writers that no longer run: ``.R.json.*.tmp`` and those inside
the resumable state folder ``R.json.partial/``. The saved states themselves stay: they are what a rerun of
an interrupted evaluation resumes from, and are removed when it finishes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from dvd.config import ConfigError
from dvd.io import remove_dead_temporaries


def check_output_path(out: str | Path, flag: str = "--out") -> Path:
    """``out`` if a results file can be written there; a one-line error naming the problem otherwise."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{flag} {out} is a directory; give a file path such as {out / 'results.json'}")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{flag} {out}: {parent} is a file, not a directory; give another path")
    if out.exists() and not out.is_file():
        raise ConfigError(f"{flag} {out} is not a regular file; give a results .json path")
    return out


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def rows_lock(out: str | Path) -> Iterator[None]:
    """Exclusive lock for one read-merge-replace of ``out`` (blocks while another process holds it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def claim_output(out: str | Path, flag: str = "--out") -> Path:
    """Check ``out`` before any work and remove what killed writers of it left behind."""
    out = check_output_path(out, flag)
    removed = remove_dead_temporaries(out.parent, out.name) + remove_dead_temporaries(Path(f"{out}.partial"))
    if removed:
        note = f"note: removed {len(removed)} temporaries left by an interrupted run of {out}"
        print(note, file=sys.stderr)
    return out
