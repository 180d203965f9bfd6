"""Helpers for tests that run trainers as real processes: single runs, runs killed with SIGKILL once a
checkpoint exists, 2-process ``torchrun`` (gloo, CPU) runs, and bitwise weight comparison."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

# one intra-op thread: tiny models on a shared machine, and the same arithmetic in every run
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def module_command(module: str, args: Sequence[str]) -> list[str]:
    """``python -m MODULE ARGS`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def run(command: Sequence[str], *, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run to completion; the whole process group is killed on timeout (never a leftover worker)."""
    process = subprocess.Popen(
        list(command),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)


def torchrun_command(module: str, args: Sequence[str], *, nproc: int = 2) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m MODULE ARGS`` (CPU processes use gloo)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*launcher, "-m", module, *args]


def kill_after_first_checkpoint(command: Sequence[str], checkpoints: Path, *, timeout: float = 180) -> None:
    """Start ``command``, SIGKILL it as soon as ``checkpoints/latest`` exists; it must not have finished."""
    process = subprocess.Popen(list(command), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = checkpoints / "latest"
    deadline = time.monotonic() + timeout
    while not pointer.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"


def assert_bitwise_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
