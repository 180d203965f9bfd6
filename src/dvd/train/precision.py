"""Numeric precision of a training step: ``auto`` resolved per device, autocast, the fp16 loss scaler,
and train/eval mode for a block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from dvd.config import ConfigError


def training_precision(precision: str, device: torch.device) -> str:
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
