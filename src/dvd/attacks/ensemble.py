"""AutoAttack's protocol over our attacks: run them in sequence on the samples still classified
correctly and keep, per sample, the first adversarial that holds.

Every claimed success is re-checked with a plain fp32 forward of the classifier before it counts,
so a low-precision attack pass (``precision="bf16"|"fp16"``) can never lower robust accuracy by
rounding; successes that do not survive are reported as ``dropped``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .apgd import apgd_attack
from .fab import fab_attack
from .objectives import (
    Classifier,
    cross_entropy,
    dlr,
    expectation,
    low_precision,
    margin,
    targeted_dlr,
    targeted_margin,
)
from .square import square_attack
from .tracking import AttackResult

ATTACKS = ("apgd-ce", "apgd-t", "apgd-dlr", "fab-t", "square")
WHITE_BOX = ("apgd-ce", "apgd-t", "apgd-dlr", "fab-t")
TARGET_CLASSES = 9  # AutoAttack standard: APGD-T and FAB-T over the 9 highest-scoring wrong classes
PRESETS = {"aa-standard": ("apgd-ce", "apgd-t", "fab-t", "square")}  # AutoAttack's standard version


def parse_attacks(spec: str) -> tuple[str, ...]:
    """``"aa-standard"`` or a comma list of attack names (``"apgd-ce,square"``), validated."""
    if spec in PRESETS:
        return PRESETS[spec]
    return check_attacks(tuple(name.strip() for name in spec.split(",") if name.strip()))


def check_attacks(attacks: Sequence[str] | str) -> tuple[str, ...]:
    """The attack names, validated (a bare string is one attack)."""
    names = (attacks,) if isinstance(attacks, str) else tuple(attacks)
    if len(set(names)) != len(names):
        raise ValueError(f"attack list {','.join(names)} names an attack twice; name each once")
    if not names:
        raise ValueError(f"attacks must name at least one of {', '.join(ATTACKS)}")
    for name in names:
        if name not in ATTACKS:
            close = difflib.get_close_matches(str(name), ATTACKS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"choose from {', '.join(ATTACKS)}"
            raise ValueError(f"unknown attack {name!r}; {hint}")
    return names


@dataclass
class EnsembleResult:
    """Per-sample outcome of the ensemble on one batch: ``attack_of`` names the attack that broke each
    sample (None if none did) and ``loss`` is that attack's loss there (for survivors: the last attack's
    best loss; NaN where nothing ran)."""

    adversarial: Tensor
    robust: Tensor
    broken_by: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    attack_of: list[str | None] = field(default_factory=list)
    loss: Tensor | None = None


def _verify(classifier: Classifier, result: AttackResult, labels: Tensor) -> tuple[Tensor, int]:
    """fp32 misclassification of the attack's points, and how many claimed successes it refutes."""
    with torch.no_grad():
        broken = classifier(result.adversarial).float().argmax(dim=1) != labels
    return broken, int((result.success & ~broken).sum())


def ensemble_attack(
    classifier: Classifier,
    x: Tensor,
    labels: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    attacks: Sequence[str] = ("apgd-ce", "apgd-t"),
    steps: int = 100,
    generator: torch.Generator,
    robust: Tensor | None = None,
    precision: str | None = None,
    square_queries: int = 5000,
    target_classes: int = TARGET_CLASSES,
    eot: int = 1,
) -> EnsembleResult:
    """Attack the samples flagged in ``robust`` (default: those classified correctly) with ``attacks``
    in order; the classifier maps [0, 1] images to logits and must be in eval mode. ``eot > 1``
    averages every objective over that many forwards (a randomised model)."""
    attacks = check_attacks(attacks)
    labels = labels.to(x.device)
    if robust is None:
        with torch.no_grad():
            robust = classifier(x).float().argmax(dim=1) == labels
    robust = robust.clone()
    adversarial = x.detach().clone()
    forward = low_precision(classifier, precision)
    out = EnsembleResult(adversarial, robust, attack_of=[None] * x.shape[0],
                         loss=torch.full((x.shape[0],), float("nan"), device=x.device))

    def commit(index: Tensor, result: AttackResult, name: str) -> Tensor:
        broken, dropped = _verify(classifier, result, labels[index])
        hit = index[broken]
        out.loss[index] = result.loss.float()
        for i in hit.tolist():
            out.attack_of[i] = name
        adversarial[hit] = result.adversarial[broken]
        robust[hit] = False
        out.broken_by[name] = out.broken_by.get(name, 0) + len(hit)
        out.dropped += dropped
        return broken

    for name in attacks:
        index = robust.nonzero()[:, 0]
        out.broken_by.setdefault(name, 0)
        if index.numel() == 0:
            continue
        xs, ys = x[index], labels[index]
        if name == "apgd-ce":
            commit(index, apgd_attack(expectation(cross_entropy(forward, ys), eot), xs, eps=eps, steps=steps,
                                      norm=norm, generator=generator), name)
        elif name == "apgd-dlr":
            commit(index, apgd_attack(expectation(dlr(forward, ys), eot), xs, eps=eps, steps=steps, norm=norm,
                                      generator=generator), name)
        elif name == "square":
            commit(index, square_attack(expectation(margin(forward, ys), eot), xs, eps=eps,
                                        queries=square_queries, norm=norm, generator=generator), name)
        else:  # apgd-t / fab-t: one run per target class, on the samples no earlier target has broken
            with torch.no_grad():
                scores = classifier(xs).float().scatter(1, ys[:, None], float("-inf"))
            ranking = scores.argsort(dim=1, descending=True)  # wrong classes, most likely first
            for rank in range(min(target_classes, ranking.shape[1] - 1)):
                alive = robust[index].nonzero()[:, 0]
                if alive.numel() == 0:
                    break
                if name == "apgd-t":
                    objective = expectation(targeted_dlr(forward, ys[alive], ranking[alive, rank]), eot)
                    result = apgd_attack(objective, xs[alive], eps=eps, steps=steps, norm=norm,
                                         generator=generator)
                else:
                    objective = expectation(targeted_margin(forward, ys[alive], ranking[alive, rank]), eot)
                    result = fab_attack(objective, xs[alive], eps=eps, steps=steps, norm=norm)
                commit(index[alive], result, name)
    return out
