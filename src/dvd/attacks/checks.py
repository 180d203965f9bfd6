"""Signs that a robust accuracy is an artefact of the evaluation (in the spirit of AutoAttack's checks).

Each check returns a flag: ``False`` when nothing is wrong, else a one-line message saying what was
seen and what to do. Raised flags go into the result and are logged as warnings, never dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .objectives import Classifier

Flag = bool | str

logger = logging.getLogger("dvd.attacks")

SATURATION_GAP = 30.0  # top-1 minus top-2 logit: softmax gradients below ~1e-13, gone in fp16/bf16
SATURATION_SHARE = 0.1  # flag when at least this share of samples is saturated
RANDOMNESS_TOLERANCE = 1e-3  # L2 distance of normalised logits; above GPU kernels' run-to-run noise


def gradient_counts(classifier: Classifier, x: Tensor, labels: Tensor) -> tuple[int, int]:
    """How many samples have an all-zero, and how many a non-finite, cross-entropy input gradient."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(classifier(x).float(), labels.to(x.device), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True) if loss.requires_grad else (None,)
    if grad is None:
        return x.shape[0], 0
    flat = grad.flatten(1)
    nonfinite = ~torch.isfinite(flat).all(dim=1)
    zero = (flat == 0).all(dim=1)
    return int(zero.sum()), int(nonfinite.sum())


def gradient_flags(n_zero: int, n_nonfinite: int, n: int) -> dict[str, Flag]:
    """``zero_gradients`` / ``nonfinite_gradients`` for any sample, as AutoAttack does."""
    return {
        "zero_gradients": n_zero > 0
        and f"{n_zero}/{n} samples have an all-zero input gradient: gradient attacks cannot move them; "
        "trust square/black-box results or use an adaptive attack",
        "nonfinite_gradients": n_nonfinite > 0
        and f"{n_nonfinite}/{n} samples have NaN/inf input gradients: fix the model's numerics "
        "before trusting robust accuracy",
    }


def saturated_count(logits: Tensor) -> int:
    """Samples whose top-1 logit exceeds the runner-up by more than :data:`SATURATION_GAP`."""
    if logits.shape[1] < 2:
        return 0
    top = logits.float().topk(2, dim=1).values
    return int((top[:, 0] - top[:, 1] > SATURATION_GAP).sum())


def saturated_softmax_flag(count: int, n: int) -> Flag:
    return count >= max(SATURATION_SHARE * n, 1) and (
        f"{count}/{n} samples have a saturated softmax (logit gap > {SATURATION_GAP:g}): cross-entropy "
        "gradients vanish; rely on the scale-invariant apgd-t / apgd-dlr / square results"
    )


def probability_output_flag(logits: Tensor) -> Flag:
    """The classifier seems to output probabilities (in [0, 1], rows summing to 1) instead of logits."""
    logits = logits.float()
    in_unit = (logits.min() > -1e-5) & (logits.max() < 1 + 1e-5)
    looks = bool(in_unit & ((logits.sum(1) - 1).abs() < 1e-5).all())
    return looks and "the classifier's outputs look like probabilities; attacks need logits (drop softmax)"


def randomness_flag(classifier: Classifier, x: Tensor, logits: Tensor) -> Flag:
    """Two forwards of the same images disagree: a randomised model needs EOT, not these attacks."""
    with torch.no_grad():
        again = classifier(x).float()
    a = F.normalize(logits.float(), dim=1)
    b = F.normalize(again, dim=1)
    differs = bool(((a - b).norm(dim=1) > RANDOMNESS_TOLERANCE).any())
    return differs and (
        "the classifier gives different outputs for the same images (randomised or in train mode?): "
        "put it in eval mode, or evaluate a randomised defence with EOT"
    )


def black_box_flag(broken: int, survivors: int, white_box: Sequence[str]) -> Flag:
    """The gradient-free square attack broke samples that the gradient attacks could not."""
    return broken > 0 and (
        f"square (black-box) broke {broken}/{survivors} samples that {'+'.join(white_box)} left standing: "
        "gradients are likely masked; report the worst case and consider an adaptive attack"
    )


def few_classes_flag(n_classes: int, attacks: Sequence[str]) -> Flag:
    """DLR losses need at least 3 (untargeted) or 4 (targeted) classes to be scale invariant."""
    needed = 4 if "apgd-t" in attacks else 3 if "apgd-dlr" in attacks else 0
    return n_classes < needed and (
        f"only {n_classes} classes: the DLR loss falls back to an unscaled margin; apgd-ce is the main attack"
    )


def not_falling(accuracy: Mapping[float, float], what: str = "eps", tolerance: float = 0.0) -> Flag:
    """Robust accuracy should not rise as the budget (eps, or steps) grows."""
    ordered = sorted(accuracy.items())
    for (a, acc_a), (b, acc_b) in zip(ordered, ordered[1:], strict=False):
        if acc_b > acc_a + tolerance:
            return (
                f"robust accuracy rises from {acc_a:.2%} at {what}={a:g} to {acc_b:.2%} at {what}={b:g}: "
                "the attack is not converging; use more steps or restarts"
            )
    return False


def warn(flags: Mapping[str, Flag]) -> None:
    """Log every raised flag as a warning."""
    for name, value in flags.items():
        if value:
            logger.warning("gradient-masking check %s: %s", name, value)
