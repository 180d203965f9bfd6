"""The demo's bookkeeping: a :class:`Stage` of the plan, the :class:`Ledger` of finished stages
(``OUT/stages.json``) and the small helpers the stage bodies share."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dvd.io import read_json, write_json


@dataclass
class Stage:
    """One step of the demo: ``run()`` does the work; ``done()`` says a previous run already did it
    (a training stage: its ``final`` folder exists; an evaluation: recorded as finished, rows on disk)."""

    name: str
    run: Callable[[], None]
    done: Callable[[], bool] = lambda: False
    group: str = "clip"
    needs: tuple[str, ...] = ()  # stages whose outputs this one reads


@dataclass
class Ledger:
    """``OUT/stages.json``: the finished stages with their wall times (the report's time per stage)."""

    path: Path
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Ledger:
        return cls(path, read_json(path) if path.is_file() else {})

    def finished(self, name: str) -> bool:
        return self.entries.get(name, {}).get("status") == "done"

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, dict[str, Any]]]:
        """The entries as on disk, under the ledger's lock, written back when the block ends: a
        read-modify-write that the demo's parallel workers cannot interleave."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.entries = read_json(self.path) if self.path.is_file() else {}
            yield self.entries
            write_json(self.path, self.entries)

    def record(self, name: str, **info: Any) -> None:
        """Update one stage's entry; safe when the demo's parallel workers record at the same time."""
        with self.locked() as entries:
            entries[name] = {**entries.get(name, {}), **info}


def exit_with_parent(poll: float = 1.0) -> threading.Thread:
    """End this process (SIGTERM) once the process that started it is gone: a ``--jobs`` worker whose demo
    was killed (SIGTERM or SIGKILL, which it cannot pass on) must not train on alone. A daemon thread looks
    at the parent every ``poll`` seconds; the stage it stops resumes from its last checkpoint on a rerun."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def check(code: int, what: str) -> None:
    """Raise when a ``dvd`` command's ``cli`` returned a non-zero status."""
    if code != 0:
        raise RuntimeError(f"{what} exited with status {code}; see the messages above")


def load_average() -> float | None:
    """The 1-minute load average when the stage ended (how shared the machine was), where known."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """The evaluations print their tables; the demo's report has them all, so keep the console short."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
