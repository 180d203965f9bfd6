"""Checkpoints: atomic keep-last-N folders that resume bitwise, and the run's stateful parts registered
once and saved or restored in one call.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dvd.config import ConfigError
from dvd.io import atomic_write, read_json, versions, write_json
from dvd.train.distributed import DistEnv, barrier, gather_objects, is_fsdp, unwrap
from dvd.train.rng import rng_state, set_rng_state
from dvd.train.schedule import FIXED_AT_START, SCHEDULE_KEYS, TrainingDiverged

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{9})$")
LATEST = "latest"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
META = "meta.json"



def save_safetensors(state: dict[str, torch.Tensor], directory: Path) -> None:
    """Default weight writer: ``model.safetensors`` holding ``state``.

    Tied weights (GPT-2's embedding and head, any tensors sharing storage) are written as separate
    copies: safetensors refuses tensors that share memory, and loading re-ties them.
    """
    seen: set[int] = set()
    tensors = {}
    for key, value in state.items():
        value = value.detach().contiguous().cpu()
        pointer = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    save_file(tensors, str(directory / WEIGHTS))


def load_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Default weight reader for :func:`save_safetensors`."""
    path = directory / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint has no weights file")
    return load_file(str(path))


def load_trusted_state(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and primitive types only, never arbitrary code."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint state file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} is not a weights-only checkpoint (loading it would run pickled code: "
            f"{str(error).splitlines()[0][:120]}); refusing it, re-save it with tensors and plain types"
        ) from None


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating tensors in ``state`` holding NaN or inf."""
    return [k for k, v in state.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for folder in [*(p for p in directory.rglob("*") if p.is_dir()), directory]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointManager:
    """``DIR/step-000000100/`` folders, each written to a temp folder, fsynced and renamed.

    A ``latest`` pointer file is written (atomically) after the rename, so a half-written
    checkpoint is never picked; only the last ``keep_last`` are kept. Weights go through
    ``save_weights(state_dict, folder)`` (safetensors), everything else into ``train_state.pt``
    (tensors and primitive types, loadable with ``weights_only=True``). ``fingerprint`` (model,
    recipe, ...) is stored and must match on resume.
    """

    def __init__(
        self,
        directory: str | Path,
        env: DistEnv,
        *,
        keep_last: int = 3,
        fingerprint: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        save_weights: Callable[[dict[str, torch.Tensor], Path], None] = save_safetensors,
        load_weights: Callable[[Path], dict[str, torch.Tensor]] = load_safetensors,
    ) -> None:
        if keep_last < 1:
            raise ConfigError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = Path(directory)
        self.env = env
        self.keep_last = keep_last
        self.fingerprint = dict(fingerprint or {})
        self.config = dict(config or {})
        self.save_weights = save_weights
        self.load_weights = load_weights

    # -- finding -----------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first (temp folders and folders without meta ignored)."""
        if not self.directory.is_dir():
            return []
        found = [
            p
            for p in self.directory.iterdir()
            if p.is_dir() and CHECKPOINT_PATTERN.match(p.name) and (p / META).is_file()
        ]
        return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """The checkpoint the ``latest`` pointer names, else the newest complete one, else None."""
        pointer = self.directory / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            target = self.directory / name
            if CHECKPOINT_PATTERN.match(name) and (target / META).is_file():
                return target
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume: str | None) -> Path | None:
        """``None`` -> no resume; ``latest`` -> newest (None when there is none yet); else a path."""
        if resume is None or resume == "":
            return None
        if resume == "latest":
            return self.latest()
        path = Path(resume)
        if not (path / META).is_file():
            raise FileNotFoundError(
                f"{path} is not a complete checkpoint folder (no {META}); pass resume=latest"
            )
        return path

    @staticmethod
    def branch_point(branch_from: str) -> Path:
        """The checkpoint folder ``branch_from`` names (a ``step-N`` folder of another run), checked."""
        path = Path(branch_from)
        if not (path / META).is_file():
            raise ConfigError(
                f"branch_from={branch_from} is not a complete checkpoint folder (no {META}); name a "
                "step-N folder under the other run's checkpoints/"
            )
        return path

    @staticmethod
    def step_of(path: Path) -> int:
        """The optimizer steps checkpoint folder ``path`` had taken."""
        return int(read_json(path / META)["step"])

    # -- saving ------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
    ) -> Path | None:
        """Write checkpoint ``step`` (collective: every rank calls it). Returns its folder on rank 0.

        ``state`` holds this rank's resumable pieces; ``rng`` and ``data`` entries are gathered
        from every rank, the rest are taken from rank 0. Refuses to save non-finite weights.
        """
        weights, optim_state = _full_state(model, optimizer)
        per_rank = gather_objects({"rng": rng_state(), "data": state.get("data")}, self.env)
        if not self.env.is_main:
            barrier(self.env)
            return None
        bad = non_finite_tensors(weights)
        if bad:
            barrier(self.env)
            raise TrainingDiverged(
                f"refusing to save step {step}: non-finite weights in {bad[0]} (+{len(bad) - 1} more)"
            )
        final = self.directory / f"step-{step:09d}"
        if (final / META).is_file():  # same step already saved (resumed and stopped at once)
            barrier(self.env)
            return final
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:09d}-", dir=self.directory))
        try:
            self.save_weights(weights, tmp)
            train_state = {k: v for k, v in state.items() if k != "data"}
            train_state.update(
                step=step,
                optimizer=optim_state,
                rng=[r["rng"] for r in per_rank],
                data=[r["data"] for r in per_rank],
                world_size=self.env.world_size,
            )
            torch.save(train_state, tmp / TRAIN_STATE)
            write_json(tmp / "config.json", self.config)
            write_json(tmp / "versions.json", versions())
            write_json(tmp / META, {"step": step, "fingerprint": self.fingerprint, "time": time.time()})
            _fsync_tree(tmp)
            if final.exists():  # an incomplete folder of the same name: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write(self.directory / LATEST, lambda p: p.write_text(final.name + "\n"))
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._prune()
        barrier(self.env)
        return final

    def _prune(self) -> None:
        done = self.complete()
        latest = self.latest()
        for old in done[: max(0, len(done) - self.keep_last)]:
            if old != latest:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.directory.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- loading -----------------------------------------------------------------------------
    def load(
        self, path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
        may_differ: Collection[str] = (),
    ) -> dict[str, Any]:
        """Restore weights and optimizer from ``path``; set this rank's RNG; return the train state.

        The returned dict has this rank's ``data`` position under ``"data"``. Fingerprint keys in
        ``may_differ`` are not checked (a branch changes the recipe, not the model or the schedule).
        """
        meta = read_json(path / META)
        saved = meta.get("fingerprint", {})
        for key, value in self.fingerprint.items():
            if key in may_differ:
                continue
            if key in saved and saved[key] != value:
                fix = FIXED_AT_START if key in SCHEDULE_KEYS.values() else (
                    f"use the same {key} or start a fresh output_dir"
                )
                raise ConfigError(
                    f"checkpoint {path} was trained with {key}={saved[key]!r} but this run has "
                    f"{key}={value!r}: {fix}"
                )
        state = load_trusted_state(path / TRAIN_STATE)
        if int(state["world_size"]) != self.env.world_size:
            raise ConfigError(
                f"checkpoint {path} was written by {state['world_size']} processes, this run has "
                f"{self.env.world_size}; resume with the same --nproc_per_node"
            )
        weights = self.load_weights(path)
        _set_full_state(model, optimizer, weights, state["optimizer"] if optimizer is not None else None)
        set_rng_state(state["rng"][self.env.rank])
        state["data"] = state["data"][self.env.rank]
        return state


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full model state on CPU (collective under FSDP; non-main FSDP ranks get an empty dict)."""
    if is_fsdp(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def _full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (gathered) model and optimizer state; collective under FSDP."""
    if is_fsdp(model):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=options)
    return full_model_state(model), optimizer.state_dict()


def _set_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    weights: dict[str, torch.Tensor],
    optim_state: dict[str, Any] | None,
) -> None:
    if is_fsdp(model):
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=options)
        if optimizer is not None and optim_state is not None:
            set_optimizer_state_dict(model, optimizer, optim_state, options=options)
        return
    unwrap(model).load_state_dict(weights, strict=True)
    if optimizer is not None and optim_state is not None:
        optimizer.load_state_dict(optim_state)


class Stateful(Protocol):
    """A part of a run whose state a checkpoint keeps (schedule, guard, grad scaler, data position)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    """The run's stateful parts, registered once, saved and restored in one call each.

    The model and optimizer go through the FSDP-aware full-state path of :class:`CheckpointManager`;
    every other part through its own ``state_dict``. ``data`` (the stream's position) is kept per rank,
    like the RNG states; the rest is taken from rank 0.
    """

    def __init__(
        self,
        manager: CheckpointManager,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        states: dict[str, Stateful],
    ) -> None:
        self.manager = manager
        self.model = model
        self.optimizer = optimizer
        self.states = dict(states)

    def save(self, step: int) -> Path | None:
        """Checkpoint ``step`` (collective: every rank calls it)."""
        state = {name: part.state_dict() for name, part in self.states.items()}
        return self.manager.save(step, model=self.model, optimizer=self.optimizer, state=state)

    def restore(self, path: Path, *, may_differ: Collection[str] = ()) -> int:
        """Load checkpoint ``path`` into every registered part; returns the step to continue from."""
        state = self.manager.load(path, model=self.model, optimizer=self.optimizer, may_differ=may_differ)
        for name, part in self.states.items():
            if name not in state:
                raise ConfigError(
                    f"checkpoint {path} has no {name} state (another precision or an older dvd wrote it); "
                    "resume with the settings it was written with or start a fresh output_dir"
                )
            if state[name]:  # an unused part (a disabled loss scaler) saves an empty state
                part.load_state_dict(state[name])
        return int(state["step"])

    def resume(
        self, resume: str | None, *, branch_from: str | None = None, may_differ: Collection[str] = ()
    ) -> int:
        """``resume`` (None, ``latest`` or a folder) -> the step to start from (0 when there is nothing).

        With nothing of its own to resume, a run with ``branch_from`` starts where that checkpoint of
        another run stopped: its weights, optimizer moments, schedule, data position and RNG, with this
        run's recipe from there on (fingerprint keys in ``may_differ`` may change; the rest must match).
        """
        path = self.manager.resolve(resume)
        if path is not None:
            return self.restore(path)
        if branch_from:
            return self.restore(CheckpointManager.branch_point(branch_from), may_differ=may_differ)
        return 0
