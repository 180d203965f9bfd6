"""``dvd train lm``: the language model of a LLaVA, trained on text alone before it sees an image.

LLaVA starts from a chat LM (Vicuna) that already speaks; the small world has none, so this trains one
on the world's conversations with the image left out: LLaVA JSON (a ShapesWorld root's stage-1 captions
and stage-2 instructions, or any LLaVA JSON list, text-only entries included), rendered with the VLM's
conversation template, the loss on the answers (as in instruction tuning). The result, ``OUTPUT_DIR/final``
(``save_pretrained``: safetensors, config, tokenizer), is the ``lm`` of ``dvd train vlm`` stage 1, so one
LM serves every VLM built on it, as Vicuna serves the paper's. Malformed conversations are skipped and
counted. The loop, checkpoint/resume, torchrun DDP and logging are :mod:`dvd.train.loop`'s.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from dvd.config import ConfigError, positive_int
from dvd.models.vlm import build_language_model
from dvd.models.vlm_base import hf_load
from dvd.models.vlm_conversation import VLMBatch, VLMCollator, conversation_turns, get_template
from dvd.models.vlm_tokenizer import ensure_image_token
from dvd.train.checkpoint import non_finite_tensors
from dvd.train.clip_data import make_loader_factory
from dvd.train.command import training_cli
from dvd.train.common_config import CommonTrainConfig, check_common, check_length
from dvd.train.distributed import DistEnv, unwrap, wrap_model
from dvd.train.loop import StepInfo
from dvd.train.rng import seed_everything
from dvd.train.schedule import TrainingDiverged
from dvd.train.setup import Job, train_job
from dvd.train.vlm import epoch_steps
from dvd.train.vlm_config import TINY_LLAMA
from dvd.train.vlm_data import SHAPESWORLD_FILES, DataSource, is_shapesworld
from dvd.train.vlm_model import decays, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class LmTrainConfig(CommonTrainConfig):
    """Everything ``dvd train lm`` takes (YAML file + ``key=value`` overrides)."""

    output_dir: str = "runs/lm"
    lm: str | dict[str, Any] = field(default_factory=lambda: dict(TINY_LLAMA))  # HF name/path or config dict
    tokenizer: str | None = "shapesworld"  # shapesworld[:ROOT], a name/path, or None: the LM's own
    template: str = "vicuna_v1"  # the conversation template the VLM will use
    data: str = ""  # a ShapesWorld root (its stage-1 and stage-2 LLaVA files) or a LLaVA JSON list
    max_length: int | None = 2048
    workers: int = 0
    steps: int | None = None  # default: ``epochs`` passes over the conversations
    epochs: float = 1.0
    batch_size: int = 16
    accum_steps: int = 1
    lr: float = 1e-3
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    checkpoint_every: int = 100


def check_config(cfg: LmTrainConfig) -> LmTrainConfig:
    """One-line errors naming the fix."""
    check_common(cfg)
    if cfg.distributed != "ddp":
        raise ConfigError("dvd train lm runs with distributed=ddp (a model it trains fits on one device)")
    check_length(cfg)
    if cfg.max_length is not None:
        positive_int(cfg.max_length, "max_length")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"lr must be a positive number, got {cfg.lr}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if int(cfg.workers) < 0:
        raise ConfigError(f"workers must be >= 0, got {cfg.workers}")
    get_template(cfg.template)
    return cfg


def text_source(data: str) -> tuple[list[Path], Path | None]:
    """The LLaVA JSON files ``data`` names and the ShapesWorld root, if it is one."""
    if not data:
        raise ConfigError("no training text; set data= to a ShapesWorld root or a LLaVA JSON list")
    path = Path(data)
    if path.is_dir():
        if not is_shapesworld(path):
            raise FileNotFoundError(
                f"{path} is a folder but not a ShapesWorld root (no summary.json + llava/); "
                "give a LLaVA JSON file, or generate a world with `dvd data shapesworld`"
            )
        files = [path / SHAPESWORLD_FILES[stage] for stage in sorted(SHAPESWORLD_FILES)]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: missing; regenerate it with `dvd data shapesworld`")
        return files, path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file or folder")
    return [path], None


Encoded = tuple[list[int], list[int]]  # token ids, labels


def encode_conversations(files: Sequence[Path], collator: VLMCollator) -> tuple[list[Encoded], int]:
    """Every conversation of ``files`` as (token ids, answer labels) without the image, and how many were
    skipped as malformed (the first three are warned about)."""
    encoded, skipped = [], 0
    for path in files:
        records = json.loads(path.read_text())
        if not isinstance(records, list):
            raise ValueError(f"{path}: not a LLaVA JSON list of conversations")
        for index, record in enumerate(records):
            try:
                encoded.append(collator.encode(conversation_turns(record["conversations"])))
            except ConfigError:
                raise
            except (ValueError, KeyError, TypeError) as error:
                if skipped < 3:
                    log.warning("skipping conversation %d of %s: %s", index, path, error)
                skipped += 1
    if not encoded:
        raise ValueError(f"no usable conversation in {', '.join(map(str, files))}; check the files")
    return encoded, skipped


class TextStep(nn.Module):
    """What DDP wraps: the causal LM's mean answer-token NLL on a batch."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, batch: VLMBatch) -> torch.Tensor:
        out = self.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        return out.loss


def text_loss(model: nn.Module, env: DistEnv, batch: VLMBatch, info: StepInfo) -> dict[str, Any]:
    loss = model(batch.to(env.device, non_blocking=True))
    return {"loss": loss, "answer_nll": loss.detach()}


def lm_job(cfg: LmTrainConfig, env: DistEnv) -> Job:
    """The LM, its loss and the encoded conversations, as the shared set-up takes them."""
    if not cfg.progress:  # nor transformers' own bars (loading, saving weights)
        hf_logging.disable_progress_bar()
    files, root = text_source(cfg.data)
    tokenizer = load_tokenizer(cfg, DataSource("llava", files[0], files[0].parent, root))
    if tokenizer is None or isinstance(tokenizer, str):  # a name or path, or the LM's own
        tokenizer = hf_load(AutoTokenizer.from_pretrained, tokenizer or str(cfg.lm), "tokenizer")
    image_id = ensure_image_token(tokenizer)
    collator = VLMCollator(tokenizer, get_template(cfg.template), num_image_tokens=0, image_token_id=image_id,
                           max_length=cfg.max_length)
    encoded, skipped = encode_conversations(files, collator)
    seed_everything(cfg.seed)  # the same fresh weights on every rank and on resume
    lm = build_language_model(cfg.lm, tokenizer, None).float().to(env.device).train()
    embedded = lm.get_input_embeddings().num_embeddings
    if embedded < len(tokenizer):
        raise ConfigError(f"the LM embeds {embedded} tokens but the tokenizer has {len(tokenizer)}; "
                          "give the LM's own tokenizer (tokenizer=null)")
    steps = cfg.steps or epoch_steps(len(encoded), cfg, env)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * steps)
    seed_everything(cfg.seed, env.rank)
    model = wrap_model(TextStep(lm), env, strategy="ddp")
    decay = [p for n, p in lm.named_parameters() if decays(n, p)]
    rest = [p for n, p in lm.named_parameters() if not decays(n, p)]
    groups = [{"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "lm"},
              {"params": rest, "lr": cfg.lr, "weight_decay": 0.0, "name": "lm_no_decay"}]
    return Job(
        model=model, groups=groups, loss_fn=functools.partial(text_loss, model, env),
        make_loader=make_loader_factory(encoded, cfg=cfg, env=env, collate=collator.pad),
        data_name=",".join(map(str, files)), steps=steps, warmup_steps=warmup,
        fingerprint={"vocab_size": len(tokenizer), "steps": steps, "template": cfg.template},
        description="text-only lm",
        export=functools.partial(export_final, model, tokenizer, env=env),
        summary=lambda: {"skipped_samples": skipped, "conversations": len(encoded)},
    )


def export_final(model: nn.Module, tokenizer: Any, final: Path, *, env: DistEnv) -> None:
    """Save the LM and its tokenizer with ``save_pretrained`` (rank 0): ``dvd train vlm``'s ``lm``."""
    if not env.is_main:
        return
    lm = unwrap(model).lm
    bad = non_finite_tensors(dict(lm.state_dict()))
    if bad:
        raise TrainingDiverged(f"refusing to export non-finite weights ({bad[0]})")
    lm.eval().save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)


def train_lm(cfg: LmTrainConfig) -> dict[str, Any]:
    """Run one ``dvd train lm`` job (single process or under torchrun); returns a summary."""
    return train_job(check_config(cfg), lm_job)


def cli(argv: Sequence[str]) -> int:
    """``dvd train lm --config FILE.yaml [--resume latest] [key=value ...]``"""
    return training_cli(
        argv,
        prog="dvd train lm",
        description="Text-only training of a LLaVA's language model on conversations (the image left out).",
        config_cls=LmTrainConfig,
        train=train_lm,
        summary_keys=("step", "steps", "skipped_steps", "skipped_samples", "conversations", "final",
                      "resumed_from"),
        recipes="configs/lm_*.yaml",
    )


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
