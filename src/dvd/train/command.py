"""The command-line front of every training job: ``--config FILE.yaml [--resume latest] [key=value ...]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dvd.config import load_config
from dvd.train.schedule import TrainingDiverged


def training_cli(
    argv: Sequence[str],
    *,
    prog: str,
    description: str,
    config_cls: type,
    train: Callable[[Any], dict[str, Any]],
    summary_keys: Sequence[str],
    recipes: str,
) -> int:
    """Parse the recipe and overrides, train, and print one JSON summary line on rank 0."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help=f"YAML recipe (see {recipes})")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder (same as resume=...)")
    parser.add_argument("overrides", nargs="*", help="key=value settings that override the YAML file")
    args = parser.parse_args(list(argv))
    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
    cfg = load_config(config_cls, args.config, overrides)
    try:
        summary = train(cfg)
    except TrainingDiverged as error:
        print(f"dvd: error: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: summary.get(k) for k in summary_keys}))
    return 0
