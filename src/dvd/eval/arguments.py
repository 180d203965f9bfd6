"""The command-line options every ``dvd eval`` command shares, parsed and checked into an :class:`EvalSpec`.

``add_common_arguments`` adds the flags of every evaluation (model and its row name, budgets, attack, steps,
batching, limit, seed, device, output, per-sample records); each command adds its own after it (a CLIP's
``--pretrained``, a VLM's ``--model-base``). ``parse_common`` checks them with one-line errors and claims the
results file before any work.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dvd.config import parse_eps_list, positive_int
from dvd.eval import options
from dvd.eval.output import claim_output
from dvd.eval.results import check_model_name
from dvd.eval.spec import EvalSpec


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    model_help: str,
    eps: str,
    attack: str,
    attack_help: str,
    batch_size: str,
    samples_help: str = "directory for per-sample JSONL records + adversarial images",
) -> None:
    """The flags of every evaluation; ``eps``, ``attack`` and ``batch_size`` are the command's defaults."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--model-name", default=None, help="short name for the result rows")
    parser.add_argument("--eps", default=eps, help=f"comma-separated L-inf budgets (default {eps})")
    parser.add_argument("--eps-unit", default=None, help="divide --eps by this, e.g. 255")
    parser.add_argument("--attack", default=attack, help=attack_help)
    parser.add_argument("--steps", default="100", help="attack iterations per attack run")
    parser.add_argument("--batch-size", default=batch_size, help="images per batch")
    parser.add_argument("--limit", default=None, help="evaluate the first N samples (of each dataset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results.json", help="result rows JSON (merged into if it exists)")
    parser.add_argument("--save-samples", default=None, help=samples_help)
    parser.add_argument("--no-progress", action="store_true")


@dataclass
class CommonOptions:
    """The parsed common options: the run's :class:`EvalSpec` (no dataset name yet: a command may evaluate
    several), the claimed results file and what the model is loaded from, as the rows record it."""

    spec: EvalSpec
    out: Path
    checkpoint: str

    @property
    def state_dir(self) -> Path:
        """Where the resumable per-batch states of this results file live."""
        return Path(f"{self.out}.partial")


def parse_common(
    args: argparse.Namespace,
    *,
    kind: str,
    check_attack: Callable[[str], object],
    precision: str | None = None,
) -> CommonOptions:
    """Check the common flags (``check_attack`` raises on an unknown ``--attack``), claim ``--out`` and
    refuse a row name already used there by another checkpoint; ``kind`` is "CLIP" or "VLM"."""
    check_attack(args.attack)
    eps_list = parse_eps_list(args.eps, options.eps_unit(args.eps_unit))  # checked even with --attack none
    steps = positive_int(args.steps, "--steps")
    batch_size = positive_int(args.batch_size, "--batch-size")
    limit = None if args.limit is None else positive_int(args.limit, "--limit")
    options.check_model_argument(args.model, kind=kind)
    out = claim_output(args.out)
    pretrained, vision_weights = getattr(args, "pretrained", None), getattr(args, "vision_weights", None)
    model_name = args.model_name or options.model_row_name(args.model, pretrained, vision_weights)
    checkpoint = options.model_checkpoint(args.model, pretrained, vision_weights)
    check_model_name(out, model_name, checkpoint)
    spec = EvalSpec(
        eps_list=eps_list,
        attack=args.attack,
        steps=steps,
        precision=precision,
        batch_size=batch_size,
        limit=limit,
        seed=args.seed,
        model_name=model_name,
        state_dir=Path(f"{out}.partial"),
        progress=not args.no_progress,
        save_samples=None if args.save_samples is None else Path(args.save_samples),
    )
    return CommonOptions(spec, out, checkpoint)
