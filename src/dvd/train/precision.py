"""Numeric precision of a training step: ``auto`` resolved per device, autocast, the fp16 loss scaler,
and train/eval mode for a block.

bf16 on a CPU pays where the CPU multiplies bf16 natively (AVX512-BF16 or AMX): a 2-core AMD EPYC with
AVX512-BF16 runs the quick demo's training steps 1.4-1.9x faster than in fp32 (benchmarks/README.md, "bf16
training on the CPU"). There the attention runs on PyTorch's math path: the CPU flash-attention kernel took
7-10x the math path's time in bf16 (forward + backward) at a 32-px tower's 17 tokens, 1.5x at ~150 tokens.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dvd.config import ConfigError

log = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def auto_precision(device: torch.device) -> str:
    """What ``precision=auto`` means on ``device``: bf16 on CUDA, fp32 elsewhere."""
    return "bf16" if device.type == "cuda" else "fp32"


def native_precision(precision: str, device: torch.device) -> str:
    """``precision`` (``auto`` resolved), except bf16 on a CPU without bf16 instructions: fp32 there, where
    bf16 is emulated (a VLM step of the quick demo ran 8-10x slower in bf16 than in fp32 on AVX2 kernels;
    benchmarks/README.md, "A CPU without bf16 instructions")."""
    precision = auto_precision(device) if precision == "auto" else precision
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        return "fp32"
    return precision


def training_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA and fp32 on CPU; fp16 needs CUDA; bf16 on a CPU without bf16 instructions
    runs, with a warning."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision {precision!r} is not one of auto, fp32, bf16, fp16")
    if precision == "auto":
        return auto_precision(device)
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs CUDA; use precision=fp32 (or bf16) on CPU")
    if native_precision(precision, device) != precision:  # bf16 on a CPU without bf16 instructions
        log.warning("precision bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 is "
                    "emulated and likely slower than fp32; set precision=fp32")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (a no-op for fp32); on a CPU, attention on the math path."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    if device.type == "cpu":
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


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
