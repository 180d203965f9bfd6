"""The command line of the VLM evaluations (``dvd eval caption / vqa / pope / targeted / scienceqa / mme``):
their options on top of the common ones, loading the model, writing the rows."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from dvd.config import ConfigError, positive_int, suggest
from dvd.eval.arguments import CommonOptions, add_common_arguments, parse_common
from dvd.eval.options import check_model_argument, mark_rows, model_row_name
from dvd.eval.results import flag_rising_robustness, format_table, remove_states, write_rows
from dvd.eval.vlm_objective import DTYPES, PRECISIONS
from dvd.models.llava_original import is_llava_original, load_llava_original
from dvd.models.vlm_base import VisionLanguageModel
from dvd.models.vlm_hf import load_hf_llava
from dvd.models.vlm_io import load_vlm

DEFAULT_EPS = "2/255,4/255"


def add_vlm_arguments(parser: argparse.ArgumentParser, *, attacks: Sequence[str], attack: str) -> None:
    """The options every VLM evaluation takes: the common ones, and the model's base, dtype and decoding."""
    add_common_arguments(
        parser,
        model_help="dvd VLM checkpoint dir, or HF LLaVA name / local dir",
        eps=DEFAULT_EPS,
        attack=attack,
        attack_help=f"{', '.join(attacks)} (default {attack})",
        batch_size="8",
        samples_help="directory for per-sample JSONL records + worst-case images",
    )
    parser.add_argument("--model-base", default=None, help="base LM of a LoRA / projector-only LLaVA release")
    parser.add_argument("--dataset-name", default=None, help="dataset name for the result rows")
    parser.add_argument(
        "--attack-precision",
        default="auto",
        help="autocast precision of the APGD runs: fp16, bf16, fp32 or auto (fp16 on CUDA, fp32 on CPU); "
        "the ensemble's final and targeted runs are always fp32",
    )
    parser.add_argument("--max-new-tokens", default=None, help="greedy decoding length")
    parser.add_argument(
        "--dtype", default="fp32", choices=sorted(DTYPES), help="model weights (fp32 keeps fp32 attacks fp32)"
    )


def parse_vlm(args: argparse.Namespace, attacks: Sequence[str]) -> CommonOptions:
    """Check the options, with one-line errors, and claim the results file (before any work)."""

    def check_attack(name: str) -> None:
        if name not in attacks:
            raise ConfigError(f"unknown attack {name!r}{suggest(name, attacks)}")
        if args.attack_precision not in PRECISIONS:
            raise ConfigError(
                f"unknown attack precision {args.attack_precision!r}"
                f"{suggest(args.attack_precision, PRECISIONS)}"
            )

    common = parse_common(args, kind="VLM", check_attack=check_attack, precision=args.attack_precision)
    eps_list = [0.0] if args.attack == "none" else sorted(set(common.spec.eps_list))
    tokens = None if args.max_new_tokens is None else positive_int(args.max_new_tokens, "--max-new-tokens")
    common.spec = common.spec.replace(eps_list=eps_list, max_new_tokens=tokens)
    return common


def broken_at(value: float) -> float:
    """A ``--broken-at`` threshold: any number but NaN (-inf: never counted as broken)."""
    if value != value:
        raise ConfigError("--broken-at must be a number (e.g. 0.1, or -inf to attack every sample)")
    return value


def load_model(
    spec: str, *, device: str, dtype: str = "fp32", model_base: str | None = None
) -> VisionLanguageModel:
    """A dvd checkpoint directory (``dvd_vlm.json``) via ``load_vlm``, a LLaVA in its authors' layout
    (on ``model_base`` for LoRA / projector-only releases), else an HF LLaVA name or directory."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(
            f"--device {device!r} is not a torch device; use e.g. cpu, cuda or cuda:1"
        ) from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but no CUDA device is available; use --device cpu")
    path = Path(spec)
    torch_dtype = None if dtype == "fp32" else DTYPES[dtype]
    check_model_argument(spec, kind="VLM")
    if model_base is not None and not is_llava_original(spec):
        raise ConfigError(f"--model-base applies to LoRA / projector-only LLaVA releases, not {spec}")
    if (path / "dvd_vlm.json").is_file():
        return load_vlm(path, device=device, dtype=torch_dtype)
    if is_llava_original(spec):
        return load_llava_original(spec, model_base=model_base, device=device, dtype=torch_dtype)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{spec} is neither a dvd VLM checkpoint (no dvd_vlm.json) "
            "nor an HF LLaVA directory (no config.json)"
        )
    if not path.exists() and spec.count("/") != 1:
        raise FileNotFoundError(f"{spec}: no such checkpoint directory, and not an HF name like org/model")
    return load_hf_llava(spec, device=device, dtype=torch_dtype)


def load_from_args(args: argparse.Namespace) -> VisionLanguageModel:
    """The VLM named by ``--model`` (``--device``, ``--dtype``, ``--model-base``)."""
    if getattr(args, "no_progress", False):  # nor transformers' own bar (loading the weights)
        hf_logging.disable_progress_bar()
    return load_model(args.model, device=args.device, dtype=args.dtype, model_base=args.model_base)


def model_name_of(args: argparse.Namespace) -> str:
    """The rows' ``model``: ``--model-name``, else the checkpoint's own name (never a folder like final)."""
    return args.model_name or model_row_name(args.model)


def finish(rows: list[Any], out: Path, state_dir: Path, checkpoint: str = "") -> int:
    """Merge ``rows`` (of the model loaded from ``checkpoint``) into ``out``, drop their states, print."""
    groups: dict[tuple[str, str, str], list[Any]] = {}
    for row in rows:  # robustness must not rise with eps; targeted success and the yes-ratio may
        if row.task != "targeted" and row.metric != "yes_ratio":
            groups.setdefault((row.dataset, row.metric, row.attack), []).append(row)
    for group in groups.values():
        flag_rising_robustness(group)
    write_rows(out, mark_rows(rows, checkpoint))
    remove_states(state_dir, rows)
    print(format_table(rows))
    print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)
    return 0
