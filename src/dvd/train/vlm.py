"""``dvd train vlm``: LLaVA-style two-stage training, clean or Δ² (adversarial visual instruction tuning).

- ``stage: 1``  feature alignment: only the projector trains, on captions (LLaVA's ``plain`` template:
  the image, then the caption).
- ``stage: 2``  instruction tuning from a stage-1 model (``init``): projector + language model (full or
  ``lora``), the vision tower optionally (``train_vision``), each part with its own learning rate.
- ``adversarial: true``  Δ²: every batch is replaced by PGD images that maximise each sample's answer
  NLL (see :mod:`dvd.train.vlm_step`); the paper runs it in both stages.
- ``branch_from: RUN/checkpoints/step-N``  start from another run's checkpoint (weights, optimizer,
  schedule, data position): e.g. Δ² from step N of the clean run on the same tower, the two runs then
  differing only in the adversarial steps that follow (the eps warm-up counts from step N).

A fresh model is an open_clip vision tower (a dvd CLIP checkpoint folder such as a ΔCLIP, an open_clip
name or model-config JSON) + a ``mlp2x_gelu`` projector + a Hugging Face causal LM (a name, or a config
dict: a tiny Llama by default) with the LM's tokenizer, or the small world's (``tokenizer: shapesworld``).
The loop, distributed setup (torchrun DDP / FSDP2), bf16 autocast, checkpoint/resume and logging are
:mod:`dvd.train.loop`'s, shared with ``dvd train clip``. The trained model is ``OUTPUT_DIR/final``
(:func:`dvd.models.vlm_io.save_vlm`, LoRA merged), the ``init`` of the next stage.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers.utils import logging as hf_logging

from dvd.config import ConfigError, parse_eps, to_dict
from dvd.models.vlm_io import save_vlm
from dvd.train.attack import AttackSettings
from dvd.train.checkpoint import CheckpointManager, full_model_state, non_finite_tensors
from dvd.train.clip_data import make_loader_factory
from dvd.train.command import training_cli
from dvd.train.distributed import DistEnv, is_fsdp, unwrap, wrap_model
from dvd.train.rng import seed_everything
from dvd.train.schedule import TrainingDiverged
from dvd.train.setup import Job, train_job
from dvd.train.vlm_config import VlmTrainConfig, check_config
from dvd.train.vlm_data import DataSource, build_conversations, resolve_source
from dvd.train.vlm_model import build_vlm, fsdp_units, merge_lora, optimizer_groups
from dvd.train.vlm_step import InstructionLoss, InstructionStep

# ---------------------------------------------------------------------------------------------
# the job


def train_vlm(cfg: VlmTrainConfig) -> dict[str, Any]:
    """Run one ``dvd train vlm`` job (single process or under torchrun); returns a summary."""
    return train_job(check_config(cfg), vlm_job)


def vlm_job(cfg: VlmTrainConfig, env: DistEnv) -> Job:
    """The stage's model, loss and conversations, as the shared set-up takes them."""
    if not cfg.progress:  # nor transformers' own bars (loading, saving weights)
        hf_logging.disable_progress_bar()
    source = resolve_source(cfg.data, cfg.data_format, cfg.image_root, cfg.stage)
    vlm = build_vlm(cfg, source, env.device)
    data_template = cfg.data_template or ("plain" if cfg.stage == 1 else None)
    collator = vlm.collator(max_length=cfg.max_length, template=data_template)
    dataset = build_conversations(
        source, image_size=vlm.image_size, collator=collator, caption_prompt=cfg.caption_prompt,
        augment=cfg.augment, in_memory=cfg.in_memory,
    )
    steps = cfg.steps or epoch_steps(len(dataset), cfg, env)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * steps)
    seed_everything(cfg.seed, env.rank)

    core = InstructionStep(vlm).train()
    shard = fsdp_units(vlm) if cfg.distributed == "fsdp" else ()
    model = wrap_model(core, env, strategy=cfg.distributed, shard=shard)
    attack = None
    if cfg.adversarial:
        attack = AttackSettings(
            eps=parse_eps(cfg.eps), step_size=parse_eps(cfg.attack_step_size), random_start=cfg.random_start,
            warmup_steps=cfg.eps_warmup_steps, train_mode=cfg.attack_mode == "train", seed=cfg.seed,
            warmup_start=branch_step(cfg),
        )
    loss_fn = InstructionLoss(
        model=model, vlm=vlm, env=env, attack=attack, attack_steps=cfg.attack_steps,
        loss_scale=cfg.attack_loss_scale,
    )
    lrs = {"lm": cfg.lr, "projector": cfg.projector_lr or cfg.lr, "vision": cfg.vision_lr or cfg.lr}
    kind = "Δ²" if cfg.adversarial else "clean"
    return Job(
        model=model, groups=optimizer_groups(vlm, lrs=lrs, weight_decay=cfg.weight_decay), loss_fn=loss_fn,
        make_loader=make_loader_factory(dataset, cfg=cfg, env=env, collate=collator,
                                        lengths=dataset.lengths() if cfg.group_by_length else None),
        data_name=str(source.path), steps=steps, warmup_steps=warmup,
        fingerprint={"stage": cfg.stage, "adversarial": cfg.adversarial, "lora": cfg.lora,
                     "vocab_size": len(vlm.tokenizer), "steps": steps,
                     **({"group_by_length": True} if cfg.group_by_length else {})},  # the data order
        description=f"stage {cfg.stage} {kind} vlm",
        export=functools.partial(export_final, cfg, model, source, env=env),
        summary=lambda: {"skipped_samples": dataset.skipped},
        branchable=("adversarial",),  # Δ²LLaVA may branch off a clean run's checkpoint
    )


def branch_step(cfg: VlmTrainConfig) -> int:
    """Where the run's own recipe begins: the step of its ``branch_from`` checkpoint, else 0 (the eps
    warm-up counts from there, so a branched Δ² run ramps its budget up from 0 as a fresh one does)."""
    if not cfg.branch_from:
        return 0
    return CheckpointManager.step_of(CheckpointManager.branch_point(cfg.branch_from))


def epoch_steps(samples: int, cfg: VlmTrainConfig, env: DistEnv) -> int:
    """Optimizer steps in ``cfg.epochs`` passes (each rank reads its share in full batches)."""
    batches = samples // env.world_size // cfg.batch_size
    if batches < 1:
        raise ConfigError(
            f"{samples} samples give no full batch of {cfg.batch_size} on each of {env.world_size} "
            "process(es); lower batch_size or add data"
        )
    return max(1, int(cfg.epochs * batches / cfg.accum_steps))


def export_final(
    cfg: VlmTrainConfig, model: nn.Module, source: DataSource, final: Path, *, env: DistEnv
) -> None:
    """Save the trained model with :func:`save_vlm` (LoRA merged) on rank 0; collective under FSDP."""
    if is_fsdp(model):  # gather the shards, then fill a fresh CPU copy on rank 0
        state = full_model_state(model)
        if not env.is_main:
            return
        core: nn.Module = InstructionStep(build_vlm(cfg, source, "cpu"))
        core.load_state_dict(state)
    else:
        if not env.is_main:
            return
        core = unwrap(model)
    vlm = core.vlm
    bad = non_finite_tensors(dict(vlm.state_dict()))
    if bad:
        raise TrainingDiverged(f"refusing to export non-finite weights ({bad[0]})")
    merge_lora(vlm)
    metadata = {"stage": cfg.stage, "adversarial": cfg.adversarial, "config": to_dict(cfg)}
    save_vlm(vlm.eval(), final, metadata=metadata)


def cli(argv: Sequence[str]) -> int:
    """``dvd train vlm --config FILE.yaml [--resume latest] [key=value ...]``"""
    return training_cli(
        argv,
        prog="dvd train vlm",
        description="LLaVA-style stage 1 / stage 2 training, clean or Δ² adversarial; torchrun-ready.",
        config_cls=VlmTrainConfig,
        train=train_vlm,
        summary_keys=("step", "steps", "skipped_steps", "skipped_samples", "final", "resumed_from"),
        recipes="configs/vlm_*.yaml",
    )


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
