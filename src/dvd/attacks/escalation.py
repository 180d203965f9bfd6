"""What the evaluation does when a check says its number cannot be trusted as it stands.

* Masked gradients (a masking check fired): the gradient-free Square Attack runs again with AutoAttack's
  full budget (5000 queries, ``p_init`` 0.8) on every sample still standing, and what it breaks counts.
  A defence that hides its gradients then gets the black-box number, not an optimistic one.
* Randomness (two forwards of the same input differ): attacks average their objective over several
  draws (EOT), and accuracy is the fraction correct over fresh draws, as AutoAttack's ``rand`` version.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .objectives import Classifier, expectation, margin
from .square import square_attack

ESCALATION_QUERIES = 5000  # AutoAttack standard's Square budget
SQUARE_P_INIT = 0.8  # AutoAttack standard's Square initial window fraction
RANDOM_EOT = 20  # AutoAttack's rand version: gradients averaged over 20 draws
RANDOM_DRAWS = 10  # fresh forwards over which a randomised model's accuracy is averaged
MASKING_CHECKS = (
    "zero_gradients",
    "nonfinite_gradients",
    "probability_outputs",
    "saturated_softmax",
    "black_box_beats_white_box",
)


def masking_fired(flags: Mapping[str, bool | str]) -> tuple[str, ...]:
    """The masking checks that fired."""
    return tuple(name for name in MASKING_CHECKS if flags.get(name))


def escalate(
    classifier: Classifier,
    images: Tensor,
    labels: Tensor,
    robust: Tensor,
    adversarial: Tensor,
    *,
    eps: float,
    batch_size: int,
    generator: torch.Generator,
    eot: int = 1,
    queries: int = ESCALATION_QUERIES,
    loss: Tensor | None = None,
) -> tuple[int, int]:
    """Square with the full budget on the samples flagged ``robust``; updates ``robust``,
    ``adversarial`` (and ``loss``, Square's margin) in place where a success holds in a plain forward.
    Returns (tried, broken)."""
    survivors = robust.nonzero()[:, 0]
    broken = 0
    for lo in range(0, survivors.numel(), batch_size):
        index = survivors[lo:lo + batch_size]
        objective = expectation(margin(classifier, labels[index]), eot)
        found = square_attack(objective, images[index], eps=eps, queries=queries, p_init=SQUARE_P_INIT,
                              generator=generator)
        with torch.no_grad():
            hit = classifier(found.adversarial).float().argmax(dim=1) != labels[index]
        adversarial[index[hit]] = found.adversarial[hit]
        robust[index[hit]] = False
        if loss is not None:
            loss[index[hit]] = found.loss[hit]
        broken += int(hit.sum())
    return int(survivors.numel()), broken


def escalation_flag(fired: tuple[str, ...], tried: int, broken: int, queries: int) -> str:
    return (
        f"masking checks fired ({', '.join(fired)}): square with {queries} queries ran on the {tried} "
        f"samples left standing and broke {broken}; they count in the robust accuracy"
    )


def fresh_draw_accuracy(
    classifier: Classifier, x: Tensor, labels: Tensor, draws: int, batch_size: int
) -> Tensor:
    """Per sample, the fraction of ``draws`` fresh forwards that classify ``x`` correctly."""
    correct = torch.zeros(x.shape[0], device=x.device)
    with torch.no_grad():
        for lo in range(0, x.shape[0], batch_size):
            xs, ys = x[lo:lo + batch_size], labels[lo:lo + batch_size]
            for _ in range(draws):
                correct[lo:lo + batch_size] += (classifier(xs).float().argmax(dim=1) == ys).float()
    return correct / draws


def randomized_flag(eot: int, draws: int) -> str:
    return (
        f"the classifier gives different outputs for the same images (a randomised defence, or a model in "
        f"train mode): attacked with EOT over {eot} draws; accuracy is the fraction correct over {draws} "
        "fresh draws"
    )


def randomness_dropped_flag(dropped: int) -> str:
    return (
        f"{dropped} successes found by the attack did not hold in a fresh forward: the model is randomised "
        "(not a precision effect); they were not counted"
    )
