"""The training loop shared by the CLIP and VLM trainers, as small parts a trainer wires together.

Distributed setup from the ``torchrun`` environment (DDP, or FSDP2 for large towers), autocast
(bf16 on CUDA, fp32 on CPU), gradient accumulation and clipping, a cosine schedule with warm-up,
non-finite steps skipped and counted, atomic keep-last-N checkpoints that resume bitwise
(weights, optimizer, schedule, grad scaler, RNG states of every rank, data position), TensorBoard
scalars and a progress bar on rank 0. :func:`fit` runs the steps; the trainer supplies the loss.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dvd.config import ConfigError
from dvd.io import atomic_write, read_json, versions, write_json

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{9})$")
LATEST = "latest"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
META = "meta.json"


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message names the step."""


# ---------------------------------------------------------------------------------------------
# distributed setup


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto", *, timeout_s: float = 1800.0) -> DistEnv:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set by torchrun and join the process group.

    NCCL on CUDA, gloo on CPU. ``device`` is ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    Without torchrun variables this is a single process and no group is created.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown_distributed() -> None:
    """Leave the process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_true(flag: bool, env: DistEnv) -> bool:
    """True on every rank only if ``flag`` is true on every rank (one tiny all-reduce)."""
    if not env.distributed:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device(env))
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order (small objects only: RNG states, data positions)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def _comm_device(env: DistEnv) -> torch.device:
    return env.device if env.device.type == "cuda" else torch.device("cpu")


def wrap_model(
    module: nn.Module, env: DistEnv, *, strategy: str = "ddp", shard: Sequence[nn.Module] = ()
) -> nn.Module:
    """DDP (default) or FSDP2 (``fully_shard`` on each of ``shard``, then the root) over ranks.

    Single-process runs get the module back unchanged.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"distributed strategy {strategy!r} is not one of ddp, fsdp")
    if not env.distributed:
        return module
    if strategy == "ddp":
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    if env.device.type == "cpu":  # FSDP2 picks its device mesh from the default device type
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (env.world_size,))
    else:
        mesh = None
    # FSDP2 cannot shard 0-d parameters (CLIP's logit_scale): keep them replicated and average
    # their gradients by hand, as DDP would.
    scalars = {p for p in module.parameters() if p.ndim == 0}
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(functools.partial(_average_grad, world_size=env.world_size))
    for part in shard:
        fully_shard(part, mesh=mesh)
    fully_shard(module, mesh=mesh, ignored_params=scalars or None)
    return module


def _average_grad(param: torch.Tensor, *, world_size: int) -> None:
    dist.all_reduce(param.grad)
    param.grad.div_(world_size)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Under FSDP, hold the root's parameters unsharded so submodules can be called outside forward.

    (Sharded children gather their own parameters when called.) A no-op for DDP and single process.
    """
    if not is_fsdp(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, nothing to unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ---------------------------------------------------------------------------------------------
# precision, parameters


def adamw(model: nn.Module, groups: Any, **options: Any) -> torch.optim.AdamW:
    """AdamW over ``groups``, fused into one kernel per step where PyTorch has one (CPU and CUDA
    parameters; not FSDP's sharded ones): on CPU ~10x faster than the per-tensor loop for a tiny
    CLIP's many small tensors and its 49k-token embedding."""
    devices = {p.device.type for p in model.parameters()}
    fused = not is_fsdp(model) and devices <= {"cpu", "cuda"}
    return torch.optim.AdamW(groups, fused=fused or None, **options)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA and fp32 on CPU; fp16/bf16 autocast need CUDA."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision {precision!r} is not one of auto, fp32, bf16, fp16")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs CUDA; use precision=fp32 (or bf16) on CPU")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 only (bf16 and fp32 do not need one)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


@contextlib.contextmanager
def module_mode(module: nn.Module, train: bool) -> Iterator[None]:
    """Put ``module`` in train or eval mode for the block, then restore the previous mode."""
    previous = module.training
    module.train(train)
    try:
        yield
    finally:
        module.train(previous)


# ---------------------------------------------------------------------------------------------
# schedule and non-finite guard


class CosineSchedule:
    """Linear warm-up to each group's base lr, then cosine decay to ``min_lr_ratio`` x base.

    The lr is a function of the step alone, so a resumed run (or a skipped step) cannot drift.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if total_steps < 1:
            raise ConfigError(f"total steps must be >= 1, got {total_steps}")
        if warmup_steps < 0:
            raise ConfigError(f"warm-up steps must be >= 0, got {warmup_steps}")
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.step_index = 0

    def factor(self, step: int) -> float:
        """The multiplier of the base lr at ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def apply(self, step: int) -> float:
        """Set every group's lr for ``step``; returns the first group's."""
        self.step_index = step
        factor = self.factor(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        return self.base_lrs[0] * factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "base_lrs": list(self.base_lrs),
            "step": self.step_index,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warmup_steps = int(state["warmup_steps"])
        self.total_steps = int(state["total_steps"])
        self.min_lr_ratio = float(state["min_lr_ratio"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        self.step_index = int(state["step"])


class NonFiniteGuard:
    """Counts skipped (non-finite) steps; too many in a row stop the run naming the step."""

    def __init__(self, max_in_a_row: int = 10) -> None:
        if max_in_a_row < 1:
            raise ConfigError(f"max non-finite steps in a row must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.skipped = 0
        self.in_a_row = 0

    def record(self, step: int, finite: bool, what: str = "loss or gradient") -> None:
        """Note one step's outcome; raise :class:`TrainingDiverged` after too many bad ones in a row."""
        if finite:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingDiverged(
                f"stopping at step {step}: non-finite {what} in {self.in_a_row} steps in a row "
                f"({self.skipped} skipped in all); lower the lr, raise warm-up or use precision=fp32"
            )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row, "max_in_a_row": self.max_in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = int(state["skipped"])
        self.in_a_row = int(state["in_a_row"])


# ---------------------------------------------------------------------------------------------
# RNG states (as tensors and primitives, so torch.load(weights_only=True) reads them)


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed torch, numpy and Python on this rank (each rank gets its own stream)."""
    value = seed * 1000 + rank
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (seed, rank, step, ...), stable across runs."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


# ---------------------------------------------------------------------------------------------
# data position


class DataStream:
    """Batches from a loader rebuilt per *segment*, with a resumable position (segment, index).

    ``make_loader(segment)`` must return the same batches every time it is called with the same
    segment (seeded shuffle, seeded workers). A segment is one pass over the data (epoch mode,
    ``segment_length=None``) or ``segment_length`` batches of an endless resampled stream. On
    resume the loader of the saved segment is rebuilt and the batches already consumed in it are
    read and dropped: the cost is re-reading that part of one segment (none when resampled
    segments end at checkpoints). In epoch mode with several ranks the segment ends for all ranks
    as soon as one rank runs out, so every rank takes the same number of steps.
    """

    def __init__(
        self,
        make_loader: Callable[[int], Iterable[Any]],
        env: DistEnv,
        *,
        segment_length: int | None = None,
        name: str = "dataset",
        seed: int = 0,
    ) -> None:
        if segment_length is not None and segment_length < 1:
            raise ConfigError(f"segment length must be >= 1, got {segment_length}")
        self.make_loader = make_loader
        self.env = env
        self.segment_length = segment_length
        self.name = name
        self.segment = 0
        self.index = 0
        self.samples = 0
        self.seed = seed
        self._iterator: Iterator[Any] | None = None
        self._rng: torch.Tensor | None = None

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run data code (in-process transforms, loader set-up) on this stream's own torch RNG.

        Data randomness then depends only on (seed, rank, segment, index), never on what the
        training step drew, so skipping batches on resume replays it exactly.
        """
        outer = torch.get_rng_state()
        if self._rng is None:
            torch.default_generator.manual_seed(derived_seed(self.seed, self.env.rank, self.segment))
        else:
            torch.set_rng_state(self._rng)
        try:
            yield
        finally:
            self._rng = torch.get_rng_state()
            torch.set_rng_state(outer)

    def _open(self) -> None:
        self._rng = None
        with self._own_rng():
            self._iterator = iter(self.make_loader(self.segment))
        for skipped in range(self.index):
            with self._own_rng():
                item = next(self._iterator, None)
            if item is None:
                raise ValueError(
                    f"{self.name}: segment {self.segment} ended after {skipped} batches while resuming "
                    f"at batch {self.index}; the data changed since the checkpoint was written"
                )

    def _pull(self) -> Any | None:
        if self.segment_length is not None and self.index >= self.segment_length:
            return None
        with self._own_rng():
            batch = next(self._iterator, None) if self._iterator is not None else None
        if self.segment_length is None and self.env.distributed:
            if not all_true(batch is not None, self.env):
                return None
        return batch

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._open()
        batch = self._pull()
        if batch is None:
            empty = self.index == 0
            self.segment, self.index, self._iterator = self.segment + 1, 0, None
            if empty:
                raise ValueError(f"{self.name} yielded no batch; check the data path and the batch size")
            self._open()
            batch = self._pull()
            if batch is None:
                raise ValueError(f"{self.name} yielded no batch; check the data path and the batch size")
        self.index += 1
        self.samples += _batch_size(batch)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"segment": self.segment, "index": self.index, "samples": self.samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.segment, self.index = int(state["segment"]), int(state["index"])
        self.samples = int(state.get("samples", 0))
        self._iterator = None
        self._rng = None


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 1


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_safetensors(state: dict[str, torch.Tensor], directory: Path) -> None:
    """Default weight writer: ``model.safetensors`` holding ``state``.

    Tied weights (GPT-2's embedding and head, any tensors sharing storage) are written as separate
    copies: safetensors refuses tensors that share memory, and loading re-ties them.
    """
    from safetensors.torch import save_file

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
    from safetensors.torch import load_file

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
        self, path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any]:
        """Restore weights and optimizer from ``path``; set this rank's RNG; return the train state.

        The returned dict has this rank's ``data`` position under ``"data"``.
        """
        meta = read_json(path / META)
        saved = meta.get("fingerprint", {})
        for key, value in self.fingerprint.items():
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
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def _full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (gathered) model and optimizer state; collective under FSDP."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

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
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=options)
        if optimizer is not None and optim_state is not None:
            set_optimizer_state_dict(model, optimizer, optim_state, options=options)
        return
    unwrap(model).load_state_dict(weights, strict=True)
    if optimizer is not None and optim_state is not None:
        optimizer.load_state_dict(optim_state)


# ---------------------------------------------------------------------------------------------
# logging


class MetricLogger:
    """TensorBoard scalars and a tqdm bar with ETA, on rank 0 only."""

    def __init__(
        self,
        log_dir: str | Path | None,
        env: DistEnv,
        *,
        total: int,
        start: int = 0,
        progress: bool = True,
        description: str = "train",
    ) -> None:
        self.env = env
        self.writer = None
        self.bar = None
        if not env.is_main:
            return
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=description, dynamic_ncols=True)

    def log(self, step: int, scalars: dict[str, float], *, show: Sequence[str] = ()) -> None:
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if self.bar is not None and show:
            self.bar.set_postfix({k.split("/")[-1]: f"{scalars[k]:.4g}" for k in show if k in scalars})

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class LoopSettings:
    """The knobs of :func:`fit` that every trainer exposes in its config."""

    steps: int
    accum_steps: int = 1
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    checkpoint_every: int = 100
    log_every: int = 10
    eval_every: int = 0
    stop_at: int | None = None  # end this invocation at this step (checkpointed); resume continues


@dataclass
class FitResult:
    step: int
    skipped: int
    seconds: float
    last: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepInfo:
    """Where a micro-batch sits: optimizer ``step`` (0-based), ``micro`` index, and whether to log."""

    step: int
    micro: int
    log: bool


LossFn = Callable[[Any, StepInfo], dict[str, Any]]


def fit(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: CosineSchedule,
    stream: DataStream,
    loss_fn: LossFn,
    settings: LoopSettings,
    env: DistEnv,
    checkpoints: CheckpointManager | None = None,
    logger: MetricLogger | None = None,
    guard: NonFiniteGuard | None = None,
    scaler: torch.amp.GradScaler | None = None,
    start_step: int = 0,
    evaluate: Callable[[int], dict[str, float]] | None = None,
    extra_state: Callable[[], dict[str, Any]] | None = None,
) -> FitResult:
    """Run optimizer steps ``start_step .. settings.steps`` and return where it stopped.

    ``loss_fn(batch, info)`` runs under autocast and returns a dict with ``"loss"`` (a scalar
    tensor to minimise) and any other scalars to log; ``info.log`` says whether this is a logging
    step (trainers compute costly diagnostics only then). A step whose loss or gradient
    norm is non-finite on any rank is skipped (no update) and counted.
    """
    guard = guard or NonFiniteGuard()
    params = [p for p in model.parameters() if p.requires_grad]
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    step = start_step
    started = time.perf_counter()
    last: dict[str, float] = {}
    window_samples, window_start = 0, time.perf_counter()
    device = env.device
    end = settings.steps if settings.stop_at is None else min(settings.steps, settings.stop_at)
    while step < end:
        lr = schedule.apply(step)
        is_log = settings.log_every > 0 and (step + 1) % settings.log_every == 0
        finite = True
        sums: dict[str, float] = {}
        for micro in range(settings.accum_steps):
            batch = next(stream)
            window_samples += _batch_size(batch)
            sync = ddp and micro < settings.accum_steps - 1
            with model.no_sync() if sync else contextlib.nullcontext():
                with autocast(settings.precision, device):
                    out = loss_fn(batch, StepInfo(step, micro, is_log))
                loss = out["loss"].float() / settings.accum_steps
                finite = finite and bool(torch.isfinite(loss).item())
                (scaler.scale(loss) if scaler is not None else loss).backward()
            for name, value in out.items():
                number = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
                sums[name] = sums.get(name, 0.0) + number / settings.accum_steps
        if scaler is not None:
            scaler.unscale_(optimizer)
        clip = settings.grad_clip if settings.grad_clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
        grad_finite = bool(torch.isfinite(grad_norm).item())
        ok = all_true(finite and (grad_finite or scaler is not None), env)
        if ok:
            if scaler is not None:  # fp16 overflow: the scaler skips the update and lowers the scale
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        guard.record(step, ok)
        last = {f"train/{k}": v for k, v in sums.items()}
        last.update(
            {"train/lr": lr, "train/grad_norm": float(grad_norm), "train/skipped_steps": guard.skipped}
        )
        if logger is not None:
            if is_log or step == settings.steps:
                elapsed = time.perf_counter() - window_start
                last["train/images_per_s"] = window_samples * env.world_size / max(elapsed, 1e-9)
                window_samples, window_start = 0, time.perf_counter()
                logger.log(step, last, show=("train/loss", "train/lr"))
            logger.advance()
        if evaluate is not None and settings.eval_every > 0 and step % settings.eval_every == 0:
            scores = evaluate(step)
            if logger is not None and scores:
                logger.log(step, scores)
        if checkpoints is not None and (step % settings.checkpoint_every == 0 or step == end):
            state = {
                "scheduler": schedule.state_dict(),
                "guard": guard.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "data": stream.state_dict(),
            }
            if extra_state is not None:
                state["extra"] = extra_state()
            checkpoints.save(step, model=model, optimizer=optimizer, state=state)
    return FitResult(step=step, skipped=guard.skipped, seconds=time.perf_counter() - started, last=last)


# the schedule's settings, by the config key that sets them
SCHEDULE_KEYS = {"total_steps": "steps", "warmup_steps": "warmup_steps", "min_lr_ratio": "min_lr_ratio",
                 "base_lrs": "lr"}  # fmt: skip
FIXED_AT_START = (
    "the lr schedule is fixed when a run starts; use the same value, or train longer from this run's "
    "final model in a fresh output_dir"
)


def check_same_schedule(saved: dict[str, Any], configured: dict[str, Any], path: Path) -> None:
    """Refuse to resume when the run asks for another schedule than the checkpoint's (it would be ignored)."""
    for key, name in SCHEDULE_KEYS.items():
        if saved[key] != configured[key]:
            raise ConfigError(
                f"checkpoint {path} was trained with {name}={saved[key]} but this run has "
                f"{name}={configured[key]}: {FIXED_AT_START}"
            )


def restore(
    checkpoints: CheckpointManager,
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: CosineSchedule,
    stream: DataStream,
    guard: NonFiniteGuard,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[int, dict[str, Any]]:
    """Load checkpoint ``path`` into every part; returns (step to continue from, the ``extra`` state)."""
    state = checkpoints.load(path, model=model, optimizer=optimizer)
    check_same_schedule(state["scheduler"], schedule.state_dict(), path)
    schedule.load_state_dict(state["scheduler"])
    guard.load_state_dict(state["guard"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    stream.load_state_dict(state["data"])
    return int(state["step"]), state.get("extra", {})
