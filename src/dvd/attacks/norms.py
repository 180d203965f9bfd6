"""Threat-model geometry: L-inf and L2 balls intersected with the [0, 1] image box.

Also the input validation shared by every attack, so that a bad budget or an image outside [0, 1]
fails with one clear line instead of a silently meaningless robust accuracy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NORMS = ("linf", "l2")


def check_norm(norm: str) -> str:
    """The canonical norm name (``"linf"`` or ``"l2"``); ``"Linf"``/``"L2"`` are accepted too."""
    canonical = str(norm).lower()
    if canonical not in NORMS:
        raise ValueError(f"norm {norm!r} is not supported; use 'linf' or 'l2'")
    return canonical


def check_images(x: Tensor, name: str = "images") -> None:
    """Refuse anything but a float tensor (B, ...) in [0, 1] with at least one sample."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0, 1], got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, ...) with B >= 1, got {tuple(x.shape)}")
    low, high = torch.aminmax(x.detach())
    if not (low >= 0 and high <= 1):  # NaN fails both comparisons
        raise ValueError(
            f"{name} must lie in [0, 1] (got min {low.item():.4g}, max {high.item():.4g}); "
            "pass unnormalised pixels and normalise inside the model"
        )


def check_budget(eps: float, steps: int | None = None) -> None:
    """``eps >= 0`` (finite) and, when given, ``steps >= 1``."""
    if not isinstance(eps, int | float) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0 in pixel units (e.g. 4/255), got {eps!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _view(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample vector (B,) shaped to broadcast against ``x`` (B, ...)."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def l2_norm(delta: Tensor) -> Tensor:
    """Per-sample L2 norm (B,)."""
    return delta.flatten(1).norm(dim=1)


def linf_norm(delta: Tensor) -> Tensor:
    """Per-sample L-inf norm (B,)."""
    return delta.flatten(1).abs().amax(dim=1)


def ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """The steepest-ascent direction of unit norm: sign(grad) for L-inf, grad/||grad|| for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / (_view(l2_norm(grad), grad) + 1e-12)


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project ``x_adv`` onto the eps-ball around ``x`` and then into [0, 1].

    Clipping to the box after the ball projection only shrinks every coordinate of the
    perturbation, so the result stays inside both sets.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        length = _view(l2_norm(delta), delta)
        delta = delta * (eps / (length + 1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator, *, on_sphere: bool) -> Tensor:
    """A random point of the eps-ball around ``x`` (clipped to [0, 1]).

    ``on_sphere=True`` is APGD's start: a uniform (L-inf) or Gaussian (L2) draw rescaled to norm
    exactly eps. ``on_sphere=False`` is PGD's: uniform in the L-inf cube, or a uniform radius in
    the L2 ball.
    """
    shape = x.shape
    if norm == "linf":
        noise = torch.rand(shape, generator=generator, device=generator.device, dtype=x.dtype)
        noise = (2 * noise - 1).to(x.device)
        if on_sphere:
            noise = noise / (_view(linf_norm(noise), noise) + 1e-12)
        delta = eps * noise
    else:
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        direction = noise / (_view(l2_norm(noise), noise) + 1e-12)
        if on_sphere:
            delta = eps * direction
        else:
            radius = torch.rand(shape[0], generator=generator, device=generator.device, dtype=x.dtype)
            delta = eps * _view(radius.to(x.device), x) * direction
    return (x + delta).clamp(0.0, 1.0)


def make_generator(generator: torch.Generator | None, x: Tensor, seed: int = 0) -> torch.Generator:
    """``generator`` itself, or a fresh one seeded with ``seed`` on ``x``'s device (never the global RNG)."""
    if generator is not None:
        return generator
    return torch.Generator(device=x.device).manual_seed(seed)
