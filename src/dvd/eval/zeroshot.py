"""``dvd eval zeroshot``: evaluate a CLIP on zero-shot datasets, clean and under attack.

The classifier is built in :mod:`dvd.eval.zeroshot_classifier`, evaluated in :mod:`dvd.eval.zeroshot_eval`
(both re-exported here); ``--protocol`` runs a published suite (:mod:`dvd.eval.zeroshot_protocols`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dvd.attacks.escalation import ESCALATION_QUERIES
from dvd.attacks.robustness import CHECK_QUERIES
from dvd.config import ConfigError, positive_int
from dvd.eval import options
from dvd.eval.arguments import parse_common
from dvd.eval.batching import evaluation_mode
from dvd.eval.clip_cli import (
    DEFAULT_EPS,
    add_clip_arguments,
    finish,
    load_clip,
    resolve_datasets,
    wds_path,
    write_marked,
)
from dvd.eval.results import ResultRow
from dvd.eval.zeroshot_classifier import (
    ATTACKS,
    PLACEHOLDER,
    ZeroShotClassifier,
    ZeroShotData,
    build_text_classifier,
    resolve_attacks,
)
from dvd.eval.zeroshot_eval import evaluate_zeroshot
from dvd.eval.zeroshot_protocols import run as run_protocol

__all__ = [
    "ATTACKS",
    "DEFAULT_EPS",
    "PLACEHOLDER",
    "ZeroShotClassifier",
    "ZeroShotData",
    "build_text_classifier",
    "cli",
    "evaluate_zeroshot",
    "evaluation_mode",
    "resolve_attacks",
    "resolve_datasets",
    "wds_path",
]


def cli(argv: Sequence[str]) -> int:
    """``dvd eval zeroshot``: evaluate a CLIP on zero-shot datasets, clean and under attack."""
    parser = argparse.ArgumentParser(prog="dvd eval zeroshot", description=cli.__doc__)
    add_clip_arguments(
        parser,
        attack="apgd-ce",
        attack_help="apgd-ce (default), aa (apgd-ce + apgd-t), aa-standard (+ fab-t, square), pgd, none, "
        "or a comma list of apgd-ce, apgd-t, apgd-dlr, fab-t, square",
    )
    parser.add_argument(
        "--dataset",
        action="append",
        help="CLIP_benchmark wds dir, ImageFolder + classnames.txt, ShapesWorld root, wds/<name>; repeatable",
    )
    parser.add_argument("--protocol", default=None, help="a published suite: robustvlm or dvd")
    parser.add_argument("--skip-missing", action="store_true", help="--protocol: run the datasets found")
    parser.add_argument(
        "--vision-weights", default=None, help="image-tower-only checkpoint (RobustVLM's TeCoA/FARE .pt)"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--eot", default=None, help="average gradients over N draws (default: 20 if the model is random)"
    )
    parser.add_argument(
        "--attack-precision", default=None, choices=("bf16", "fp16"), help="AMP inside the attack"
    )
    parser.add_argument("--workers", default="0", help="DataLoader workers")
    parser.add_argument(
        "--escalation-queries",
        default=str(ESCALATION_QUERIES),
        help="Square Attack queries when a gradient-masking check fires (default 5000: AutoAttack standard)",
    )
    parser.add_argument(
        "--check-queries",
        default=str(CHECK_QUERIES),
        help=f"Square Attack queries of the gradient-masking check on the samples APGD left standing "
        f"(default {CHECK_QUERIES})",
    )
    parser.add_argument(
        "--no-carry-over",
        action="store_true",
        help="attack every sample at every budget (default: one already broken at a smaller eps is not)",
    )
    args = parser.parse_args(list(argv))
    if args.protocol is not None:
        return run_protocol(args)
    if not args.dataset:
        raise ConfigError("give --dataset (repeatable) or --protocol robustvlm|dvd")
    eot = None if args.eot is None else positive_int(args.eot, "--eot")
    escalation_queries = positive_int(args.escalation_queries, "--escalation-queries")
    check_queries = positive_int(args.check_queries, "--check-queries")
    workers = options.workers(args.workers)
    common = parse_common(args, kind="CLIP", check_attack=resolve_attacks, precision=args.attack_precision)
    model, transform = load_clip(args, common.spec.model_name)
    all_rows: list[ResultRow] = []
    for dataset in args.dataset:
        found = resolve_datasets(dataset, transform=transform, root=args.dataset_root, split=args.split)
        for name, data in found:
            spec = common.spec.replace(dataset_name=name)
            carry_over = not args.no_carry_over
            rows = evaluate_zeroshot(model, data, spec, workers=workers, eot=eot, carry_over=carry_over,
                                     escalation_queries=escalation_queries, check_queries=check_queries)
            all_rows += write_marked(common.out, rows, common.checkpoint)
    return finish(all_rows, common.out, common.state_dir)  # every (dataset, eps) of this run is in the file
