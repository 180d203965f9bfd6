"""Adversarial attacks over objectives, and robustness evaluation (imports only torch).

Images are float tensors in [0, 1]; budgets are in pixel units. Objectives map images to a
per-sample loss to maximise (plus success flags from the same forward); PGD, APGD, FAB and the
Square Attack optimise any of them; the ensemble and :func:`evaluate_robustness` follow AutoAttack's
protocol. Models are put in eval mode by the caller; attacks freeze their parameters meanwhile.
"""

from .apgd import apgd, apgd_attack
from .checks import not_falling
from .ensemble import ATTACKS, PRESETS, EnsembleResult, ensemble_attack, parse_attacks
from .fab import fab, fab_attack
from .gradients import frozen_parameters, value_and_grad
from .objectives import (
    Objective,
    ObjectiveOutput,
    clip_contrastive,
    cross_entropy,
    dlr,
    embedding_distance,
    expectation,
    from_callable,
    lm_nll,
    low_precision,
    margin,
    targeted_dlr,
    targeted_margin,
)
from .pgd import pgd, pgd_attack
from .robustness import RobustnessResult, evaluate_robustness
from .square import square, square_attack
from .tracking import AttackResult

__all__ = [
    "ATTACKS",
    "PRESETS",
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
    "expectation",
    "fab",
    "fab_attack",
    "from_callable",
    "frozen_parameters",
    "lm_nll",
    "low_precision",
    "margin",
    "not_falling",
    "parse_attacks",
    "pgd",
    "pgd_attack",
    "square",
    "square_attack",
    "targeted_dlr",
    "targeted_margin",
    "value_and_grad",
]
