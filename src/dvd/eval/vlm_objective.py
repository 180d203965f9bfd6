"""The objective of an attack on a vision-language model: the per-sample NLL of reference answers (maximised),
or of a target answer (minimised), and APGD on it inside the L-inf ball."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dvd.attacks import apgd, lm_nll
from dvd.config import ConfigError, suggest
from dvd.models.vlm_base import VisionLanguageModel
from dvd.models.vlm_conversation import VLMBatch
from dvd.train.precision import autocast

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BALL_TOLERANCE = 1e-6  # float32 rounding of (x + delta) - x


def resolve_precision(precision: str | None, device: torch.device | str) -> str | None:
    """The autocast precision of an attack: None (fp32), "fp16" or "bf16"; "auto" = fp16 on CUDA only."""
    if precision is None or precision == "fp32":
        return None
    if precision == "auto":
        return "fp16" if torch.device(device).type == "cuda" else None
    if precision not in DTYPES:
        raise ConfigError(f"unknown attack precision {precision!r}{suggest(precision, PRECISIONS)}")
    return precision


class AnswerNLL:
    """``fn(images, batch)`` for :func:`dvd.attacks.lm_nll`: the model's per-sample NLL of the answers in
    ``batch`` (a dict of :class:`VLMBatch` fields, so the attack can slice it), optionally under autocast.

    ``greedy_success``: also return, per sample, whether greedy decoding would now write the answer
    exactly (a targeted attack's success, so APGD stops attacking the samples it has won)."""

    def __init__(
        self, model: VisionLanguageModel, precision: str | None = None, *, greedy_success: bool = False
    ) -> None:
        self.__wrapped__ = model  # lets the attack find (and freeze) the model's parameters
        self.model = model
        self.precision = precision or "fp32"
        self.greedy_success = greedy_success

    def __call__(self, images: Tensor, batch: dict[str, Tensor]) -> Tensor | tuple[Tensor, Tensor]:
        tokens = VLMBatch(**batch).to(images.device)
        with autocast(self.precision, images.device):  # on a CPU, attention on the math path
            out = self.model(images, tokens, greedy=self.greedy_success)
        nll = out.per_sample_nll.float()
        return (nll, out.answer_is_greedy) if self.greedy_success else nll


def answer_objective(
    model: VisionLanguageModel,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    targeted: bool = False,
    precision: str | None = None,
) -> Any:
    """The NLL of ``answers`` given the images and ``prompts``: maximised, or minimised when ``targeted``."""
    batch = model.collator().pairs(list(prompts), list(answers))
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return lm_nll(AnswerNLL(model, precision, greedy_success=targeted), batch=fields, targeted=targeted)


def check_in_ball(adversarial: Tensor, images: Tensor, eps: float) -> None:
    """Refuse images outside the L-inf ball of radius ``eps`` around ``images``, or outside [0, 1]."""
    distance = float((adversarial - images).abs().amax()) if images.numel() else 0.0
    low, high = (float(v) for v in torch.aminmax(adversarial)) if adversarial.numel() else (0.0, 1.0)
    if distance > eps + BALL_TOLERANCE or low < 0 or high > 1:
        raise RuntimeError(
            f"attack left the threat model: L-inf distance {distance:.6g} (eps {eps:.6g}), "
            f"pixel range [{low:.4g}, {high:.4g}]; this is a bug in the attack"
        )


def attack_answers(
    model: VisionLanguageModel,
    images: Tensor,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    eps: float,
    steps: int,
    generator: torch.Generator,
    targeted: bool = False,
    precision: str | None = None,
    start: Tensor | None = None,
) -> Tensor:
    """APGD (L-inf) on the images against the NLL of ``answers``, from ``start`` or a random point;
    the result is checked to lie in the ball."""
    objective = answer_objective(model, prompts, answers, targeted=targeted, precision=precision)
    adversarial = apgd(objective, images, eps=eps, steps=steps, generator=generator, x_init=start).detach()
    check_in_ball(adversarial, images, eps)
    return adversarial

