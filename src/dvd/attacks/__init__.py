"""Adversarial attacks over objectives, and robustness evaluation (imports only torch).

Images are float tensors in [0, 1]; budgets are in pixel units. Objectives map images to a
per-sample loss to maximise (plus success flags from the same forward); PGD, APGD and the Square
Attack optimise any of them; the ensemble and :func:`evaluate_robustness` follow AutoAttack's
protocol. Models are put in eval mode by the caller; attacks freeze their parameters meanwhile.
"""

from .apgd import apgd, apgd_attack
from .checks import not_falling
from .ensemble import ATTACKS, EnsembleResult, ensemble_attack
from .gradients import frozen_parameters, value_and_grad
from .objectives import (
    Objective,
    ObjectiveOutput,
    clip_contrastive,
    cross_entropy,
    dlr,
    embedding_distance,
    from_callable,
    lm_nll,
    low_precision,
    margin,
    targeted_dlr,
)
from .pgd import pgd, pgd_attack
from .robustness import RobustnessResult, evaluate_robustness
from .square import square, square_attack
from .tracking import AttackResult

__all__ = [
    "ATTACKS",
    "AttackResult",
    "EnsembleResult",
    "Objective",
    "ObjectiveOutput",
    "RobustnessResult",
    "apgd",
    "apgd_attack",
    "clip_contrastive",
    "cross_entropy",
    "dlr",
    "embedding_distance",
    "ensemble_attack",
    "evaluate_robustness",
    "from_callable",
    "frozen_parameters",
    "lm_nll",
    "low_precision",
    "margin",
    "not_falling",
    "pgd",
    "pgd_attack",
    "square",
    "square_attack",
    "targeted_dlr",
    "value_and_grad",
]
