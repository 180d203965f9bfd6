"""``evaluate_robustness``: clean and robust accuracy of any classifier under the attack ensemble."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import checks, escalation
from .ensemble import WHITE_BOX, check_attacks, ensemble_attack
from .gradients import frozen_parameters
from .norms import check_budget, check_images, check_norm
from .objectives import Classifier, expectation, margin, modules_of
from .square import square_attack

CHECK_QUERIES = 200  # square queries of the gradient-free check on the white-box survivors


@dataclass
class RobustnessResult:
    """Per-sample outcome of :func:`evaluate_robustness`.

    ``adversarial`` is the adversarial image where a sample was broken and the clean image elsewhere;
    ``flags`` maps each check to ``False`` or a message; ``broken_by`` counts samples per attack
    (``square-check`` for those the gradient-free check broke, ``square-escalation`` for those the
    full-budget Square run after a masking check broke; they count as broken). ``clean_score`` and
    ``robust_score`` are per-sample fractions correct: 0/1 for a deterministic model, the fraction over
    fresh draws for a randomised one (``randomized``, attacked with EOT over ``eot`` draws).
    ``attack_of`` names, per sample, the attack that broke it (None: not broken) and ``loss`` is that
    attack's loss there (NaN where no attack ran).
    """

    clean_correct: Tensor
    robust_correct: Tensor
    adversarial: Tensor
    flags: dict[str, bool | str]
    eps: float
    norm: str
    attacks: tuple[str, ...]
    steps: int
    seed: int
    broken_by: dict[str, int] = field(default_factory=dict)
    low_precision_dropped: int = 0
    seconds: float = 0.0
    clean_score: Tensor | None = None
    robust_score: Tensor | None = None
    randomized: bool = False
    eot: int = 1
    escalated: bool = False
    attack_of: list[str | None] = field(default_factory=list)
    loss: Tensor | None = None

    def __post_init__(self) -> None:
        if self.clean_score is None:
            self.clean_score = self.clean_correct.float()
        if self.robust_score is None:
            self.robust_score = self.robust_correct.float()

    @property
    def n(self) -> int:
        return int(self.clean_correct.numel())

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean_score.mean())

    @property
    def robust_accuracy(self) -> float:
        return float(self.robust_score.mean())


def _check_labels(labels: Tensor, n: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise ValueError("labels must be a 1-d integer tensor (B,) of class indices")
    if labels.numel() != n:
        raise ValueError(f"{labels.numel()} labels for {n} images; pass one label per image")
    return labels.long()


def evaluate_robustness(
    classifier: Classifier,
    images: Tensor,
    labels: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    attacks: Sequence[str] = ("apgd-ce", "apgd-t"),
    steps: int = 100,
    seed: int = 0,
    batch_size: int | None = None,
    precision: str | None = None,
    check: bool = True,
    square_queries: int = 5000,
    check_queries: int = CHECK_QUERIES,
    escalate: bool = True,
    escalation_queries: int = escalation.ESCALATION_QUERIES,
    eot: int | None = None,
    draws: int = escalation.RANDOM_DRAWS,
) -> RobustnessResult:
    """Clean and robust accuracy of ``classifier`` (images in [0, 1] -> logits, in eval mode).

    Runs ``attacks`` (AutoAttack's protocol: only still-correct samples are attacked, the first
    adversarial that holds in fp32 is kept) at budget ``eps`` (0 = clean only) in batches of
    ``batch_size`` (default: all at once). ``precision="bf16"|"fp16"`` runs the attacks' forwards
    under autocast; every success is re-checked in fp32. ``check`` runs the gradient-masking checks,
    including ``check_queries`` square queries on the samples the gradient attacks left standing; when
    one fires and ``escalate`` is on, Square with ``escalation_queries`` runs on every survivor (L-inf).
    A randomised classifier (two forwards differ) is attacked with EOT over ``eot`` draws (None: 1 for
    a deterministic model, 20 for a randomised one) and scored over ``draws`` fresh forwards.
    """
    start = time.perf_counter()
    check_images(images)
    labels = _check_labels(labels, images.shape[0]).to(images.device)
    norm = check_norm(norm)
    check_budget(eps, steps)
    attacks = check_attacks(attacks)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if precision not in (None, "bf16", "fp16"):
        raise ValueError(f"precision {precision!r} is not supported; use 'bf16', 'fp16' or None")
    if "square" in attacks and norm != "linf":
        raise ValueError("the square attack is L-inf only; drop 'square' from attacks for norm='l2'")
    for name, value in (("eot", eot), ("draws", draws)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    n = images.shape[0]
    size = n if batch_size is None else batch_size
    generator = torch.Generator(device=images.device).manual_seed(seed)
    clean_correct = torch.zeros(n, dtype=torch.bool, device=images.device)
    robust_correct = torch.zeros_like(clean_correct)
    adversarial = images.detach().clone()
    attack_of: list[str | None] = [None] * n
    loss = torch.full((n,), float("nan"), device=images.device)
    broken_by: dict[str, int] = {}
    dropped = n_zero = n_nonfinite = n_saturated = square_broken = square_tried = 0
    flags: dict[str, bool | str] = {}
    run_check_square = check and eps > 0 and norm == "linf" and "square" not in attacks

    with frozen_parameters(modules_of(classifier)):
        with torch.no_grad():
            first = images[:size].detach()
            randomized = bool(checks.randomness_flag(classifier, first, classifier(first).float()))
        eot = eot if eot is not None else escalation.RANDOM_EOT if randomized else 1
        for lo in range(0, n, size):
            x, y = images[lo:lo + size].detach(), labels[lo:lo + size]
            with torch.no_grad():
                logits = classifier(x).float()
            clean = logits.argmax(dim=1) == y
            clean_correct[lo:lo + size] = clean
            if check:
                zero, nonfinite = checks.gradient_counts(classifier, x, y)
                n_zero, n_nonfinite = n_zero + zero, n_nonfinite + nonfinite
                n_saturated += checks.saturated_count(logits)
                if lo == 0:
                    flags["probability_outputs"] = checks.probability_output_flag(logits)
                    flags["few_classes"] = checks.few_classes_flag(logits.shape[1], attacks)
            if eps == 0:
                robust_correct[lo:lo + size] = clean
                continue
            result = ensemble_attack(classifier, x, y, eps=eps, norm=norm, attacks=attacks, steps=steps,
                                     generator=generator, robust=clean, precision=precision,
                                     square_queries=square_queries, eot=eot)
            robust, x_adv = result.robust, result.adversarial
            attack_of[lo:lo + size] = result.attack_of
            loss[lo:lo + size] = result.loss
            dropped += result.dropped
            for name, count in result.broken_by.items():
                broken_by[name] = broken_by.get(name, 0) + count
            if "square" in attacks and any(a in WHITE_BOX for a in attacks[: attacks.index("square")]):
                square_broken += result.broken_by.get("square", 0)
            if run_check_square and bool(robust.any()):
                index = robust.nonzero()[:, 0]
                found = square_attack(expectation(margin(classifier, y[index]), eot), x[index], eps=eps,
                                      queries=check_queries, generator=generator)
                with torch.no_grad():
                    hit = classifier(found.adversarial).float().argmax(dim=1) != y[index]
                x_adv[index[hit]] = found.adversarial[hit]
                robust[index[hit]] = False
                loss[lo + index[hit]] = found.loss[hit]
                for i in index[hit].tolist():
                    attack_of[lo + i] = "square-check"
                square_tried += index.numel()
                square_broken += int(hit.sum())
                broken_by["square-check"] = broken_by.get("square-check", 0) + int(hit.sum())
            robust_correct[lo:lo + size] = robust
            adversarial[lo:lo + size] = x_adv

        if check:
            flags.update(checks.gradient_flags(n_zero, n_nonfinite, n))
            flags["saturated_softmax"] = checks.saturated_softmax_flag(n_saturated, n)
            white = tuple(a for a in attacks if a in WHITE_BOX)
            survivors = square_tried or int(robust_correct.sum()) + square_broken
            flags["black_box_beats_white_box"] = bool(white) and checks.black_box_flag(
                square_broken, survivors, white
            )
        fired = escalation.masking_fired(flags)
        full_square = "square" in attacks and square_queries >= escalation_queries
        escalated = escalate and bool(fired) and eps > 0 and norm == "linf" and not full_square
        if escalated:
            before = robust_correct.clone()
            tried, broken = escalation.escalate(classifier, images, labels, robust_correct, adversarial,
                                                eps=eps, batch_size=size, generator=generator, eot=eot,
                                                queries=escalation_queries, loss=loss)
            for i in (before & ~robust_correct).nonzero()[:, 0].tolist():
                attack_of[i] = "square-escalation"
            broken_by["square-escalation"] = broken
            flags["escalated"] = escalation.escalation_flag(fired, tried, broken, escalation_queries)
        else:
            flags["escalated"] = False
        clean_score, robust_score = clean_correct.float(), robust_correct.float()
        if randomized:
            clean_score = escalation.fresh_draw_accuracy(classifier, images, labels, draws, size)
            robust_score = clean_score
            if eps > 0:  # a sample wrong at the first forward was not attacked: it is not robust
                robust_score = escalation.fresh_draw_accuracy(classifier, adversarial, labels, draws, size)
                robust_score = robust_score * clean_correct.float()
    flags["randomized"] = randomized and escalation.randomized_flag(eot, draws)
    if randomized:
        flags["low_precision_dropped"] = dropped > 0 and escalation.randomness_dropped_flag(dropped)
    else:
        flags["low_precision_dropped"] = dropped > 0 and (
            f"{dropped} successes claimed under {precision or 'fp32'} did not hold in the fp32 re-check "
            "and were not counted"
        )
    checks.warn(flags)
    return RobustnessResult(
        clean_correct=clean_correct,
        robust_correct=robust_correct,
        adversarial=adversarial,
        flags=flags,
        eps=float(eps),
        norm=norm,
        attacks=attacks,
        steps=steps,
        seed=seed,
        broken_by=broken_by,
        low_precision_dropped=dropped,
        seconds=time.perf_counter() - start,
        clean_score=clean_score,
        robust_score=robust_score,
        randomized=randomized,
        eot=eot,
        escalated=escalated,
        attack_of=attack_of,
        loss=loss,
    )
