"""fp32 linear layers on a CPU through oneDNN instead of the BLAS PyTorch links (MKL).

On this project's AMD EPYC (AVX-512), MKL multiplied fp32 matrices about half as fast as oneDNN on the
same CPU (``MKL_VERBOSE`` names no instruction set there): one thread, at the demo's shapes ([1088, 128]
@ [128, 512] and the like), ran 89-98 GFLOP/s in ``torch.mm`` and 194-216 in oneDNN
(benchmarks/README.md, "fp32 linear layers through oneDNN"). :func:`onednn_linear` routes
``torch.nn.functional.linear``, which every ``nn.Linear`` and every ``nn.MultiheadAttention``
projection calls, through oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the kernel Inductor
uses for a CPU's linear layers) in the forward pass and for both gradients. It takes plain fp32 CPU
tensors outside autocast only; anything else (CUDA, bf16, autocast, tensor subclasses, tracing and
compiling) goes to PyTorch's own ``linear``.

The results are fp32, equal to PyTorch's up to rounding (oneDNN sums in another order than MKL), and the
same from run to run. The ``dvd`` command enters it for every job; ``DVD_ONEDNN_LINEAR=0`` in the
environment keeps PyTorch's own ``linear`` there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

ENV = "DVD_ONEDNN_LINEAR"

_lock = threading.Lock()
_depth = 0
_original = F.linear
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not subclasses such as DTensor


@functools.cache
def available() -> bool:
    """Whether this PyTorch build has oneDNN and its linear kernel."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018 - resolving it is the check
    except (AttributeError, RuntimeError):
        return False
    return True


def _mm_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T (+ bias)`` for 2-D fp32 CPU tensors, by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    """``F.linear`` whose three matrix products (output, input gradient, weight gradient) run in oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = _mm_t(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _mm_t(grad2, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = _mm_t(grad2.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2.sum(0)
        return grad_x, grad_w, grad_b


def _plain_fp32_cpu(t: torch.Tensor | None) -> bool:
    return t is None or (type(t) in _PLAIN and t.dtype == torch.float32 and t.device.type == "cpu")


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear``, through oneDNN where it takes the tensors (see the module doc)."""
    if (
        _plain_fp32_cpu(input)
        and _plain_fp32_cpu(weight)
        and _plain_fp32_cpu(bias)
        and weight.dim() == 2
        and input.dim() >= 1
        and input.numel() > 0
        and weight.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_scripting()
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    ):
        return _Linear.apply(input, weight, bias)
    return _original(input, weight, bias)


def enabled_by_env() -> bool:
    """False where ``DVD_ONEDNN_LINEAR`` is 0, false, no or off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def active() -> bool:
    """Whether ``torch.nn.functional.linear`` is this module's now."""
    return F.linear is linear


@contextlib.contextmanager
def onednn_linear(enable: bool | None = None) -> Iterator[bool]:
    """Within the block, ``torch.nn.functional.linear`` is :func:`linear` (process-wide; nests), unless
    ``enable`` is False (None: unless ``DVD_ONEDNN_LINEAR=0``) or this PyTorch has no oneDNN. Yields
    :func:`active` (a disabled block inside an enabled one does not switch it off)."""
    global _depth
    if not ((enabled_by_env() if enable is None else enable) and available()):
        yield active()
        return
    with _lock:
        _depth += 1
        F.linear = linear
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                F.linear = _original
