"""Where a training process sits under ``torchrun`` and how its model is wrapped: DDP, or FSDP2 for
large towers; single-process runs get everything back unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from dvd.config import ConfigError


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
    """Wait for every rank (a no-op in a single process)."""
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
    # FSDP2 picks its device mesh from the default device type: name the CPU one
    mesh = init_device_mesh("cpu", (env.world_size,)) if env.device.type == "cpu" else None
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
    """Whether ``model`` was sharded by FSDP2's ``fully_shard``."""
    return isinstance(model, FSDPModule)
