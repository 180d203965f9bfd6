"""``dvd train clip``: ΔCLIP adversarial pre-training, clean CLIP, and the TeCoA / FARE fine-tuning baselines.

Recipes (``recipe=``):

- ``clean``  open_clip's contrastive training.
- ``delta``  ΔCLIP: per batch the texts are encoded once (their detached features serve the attack),
  PGD-K maximises each image's contrastive loss against them in pixel space with the parameters
  frozen (gradients w.r.t. the images only; no text-tower re-runs, no weight-gradient work), then
  the training step runs on the adversarial images with their clean captions.
- ``tecoa``  fine-tunes a pre-trained CLIP's image tower with cross-entropy over class-name text
  embeddings on adversarial images (Mao et al., ICLR 2023).
- ``fare``   fine-tunes the image tower so that embeddings of adversarial images stay close (squared
  L2) to the frozen original tower's clean embeddings (Schlarmann et al., ICML 2024).

Choices worth knowing:

- The attack runs with the model in eval mode (``attack_mode=eval``); for ViTs without dropout or
  batch norm this is the same function as train mode.
- Under DDP every rank attacks its own images against its own batch's texts (the local B x B
  contrastive loss): no communication inside the attack. The training loss gathers features
  across ranks (open_clip's ``ClipLoss``, ``local_loss`` + ``gather_with_grad`` by default).
- ``distributed=fsdp`` (FSDP2) shards the transformer blocks of both towers; the 0-d ``logit_scale``
  stays replicated with its gradient averaged by hand, and the root's parameters are gathered again
  after the attack's backward (FSDP reshards after every backward). It matches DDP to ~1e-7.
- A CLIPA/AdvXL-style ``phases`` schedule trains most steps at low resolution: images are loaded
  at the model's size and downsampled on the device; the positional embedding stays a full-size
  parameter and is bilinearly interpolated in the forward (a ``torch.nn.utils.parametrize``
  parametrization); each phase sets its own number of attack steps.
- Resume (``resume=latest``) restores weights, optimizer, schedule, grad scaler, every rank's RNG
  states and data position: an epoch-mode stream re-reads and drops the batches already consumed in
  the current epoch (costs reading them again); a resampled stream is re-seeded at every checkpoint,
  so nothing is re-read. A killed run resumed this way ends with the uninterrupted run's weights.
- Checkpoints are folders in open_clip's layout (``open_clip_model.safetensors`` +
  ``open_clip_config.json``): ``open_clip.create_model("local-dir:DIR")`` loads any of them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dvd.config import parse_eps, to_dict
from dvd.eval.zeroshot import build_text_classifier
from dvd.models.clip import DvdCLIP, create_clip
from dvd.train.attack import AttackSettings
from dvd.train.checkpoint import full_model_state
from dvd.train.clip_config import NORMALIZATIONS, ClipTrainConfig, check_config
from dvd.train.clip_data import build_dataset, check_shard_count, make_loader_factory
from dvd.train.clip_eval import make_evaluator
from dvd.train.clip_export import OpenClipWeights, export_final
from dvd.train.clip_losses import ContrastiveLoss, ContrastiveStep, FareLoss, ImageTowerStep, TecoaLoss
from dvd.train.clip_resolution import Resolution, build_phases
from dvd.train.command import training_cli
from dvd.train.distributed import DistEnv, unwrap, wrap_model
from dvd.train.precision import module_mode
from dvd.train.rng import seed_everything
from dvd.train.scratch import random_init_expected
from dvd.train.setup import Job, train_job


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on gains, biases, embeddings' scale or the temperature)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bias" in name or "ln" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_start_model(cfg: ClipTrainConfig, device: torch.device) -> DvdCLIP:
    """Random init for clean/delta (unless ``pretrained``); the pre-trained CLIP for tecoa/fare.

    ``normalization`` other than ``model`` replaces the model's mean/std (saved with its weights).
    """
    if cfg.pretrained is not None and Path(cfg.pretrained).is_dir():
        clip = create_clip(cfg.pretrained, device=device)
    else:
        with random_init_expected() if cfg.pretrained is None else contextlib.nullcontext():
            clip = create_clip(cfg.model, pretrained=cfg.pretrained, device=device)
    if cfg.normalization in NORMALIZATIONS:
        clip.set_normalization(*NORMALIZATIONS[cfg.normalization])
    return clip


def train_clip(cfg: ClipTrainConfig) -> dict[str, Any]:
    """Run one ``dvd train clip`` job (single process or under torchrun); returns a summary."""
    return train_job(check_config(cfg), clip_job)


def clip_job(cfg: ClipTrainConfig, env: DistEnv) -> Job:
    """The recipe's model, loss and data, as the shared set-up takes them."""
    seed_everything(cfg.seed)  # identical initial weights on every rank
    clip = load_start_model(cfg, env.device)
    phases = build_phases(cfg, clip)
    resolution = Resolution(clip, phases)
    if cfg.grad_checkpointing:
        clip.model.set_grad_checkpointing(True)
    seed_everything(cfg.seed, env.rank)

    step_size = parse_eps(cfg.attack_step_size) if cfg.attack_step_size is not None else None
    attack = AttackSettings(
        eps=parse_eps(cfg.eps), step_size=step_size, random_start=cfg.random_start,
        warmup_steps=cfg.eps_warmup_steps, train_mode=cfg.attack_mode == "train", seed=cfg.seed,
        default_step_rule="delta" if cfg.recipe == "delta" else "fixed",
    )
    dataset, collate, info = build_dataset(cfg, clip)
    check_shard_count(dataset, cfg, env)

    if cfg.recipe in ("tecoa", "fare"):  # only the image tower trains
        clip.requires_grad_(False)
        clip.model.visual.requires_grad_(True)
        core: nn.Module = ImageTowerStep(clip, normalize=cfg.recipe == "tecoa")
    else:
        core = ContrastiveStep(clip)
    core.train()
    shard = _fsdp_units(clip) if cfg.distributed == "fsdp" else ()
    model = wrap_model(core, env, strategy=cfg.distributed, shard=shard)

    if cfg.recipe == "tecoa":
        with torch.no_grad(), module_mode(clip, False):
            weights = build_text_classifier(clip, info["classnames"], info["templates"])
        loss_fn: Any = TecoaLoss(
            model=model, clip=clip, env=env, phases=phases, attack=attack, class_weights=weights
        )
    elif cfg.recipe == "fare":
        reference = load_start_model(cfg, env.device).eval().requires_grad_(False)
        loss_fn = FareLoss(model=model, clip=clip, reference=reference, env=env, phases=phases, attack=attack)
    else:
        loss_fn = ContrastiveLoss(
            model=model, clip=clip, env=env, phases=phases, resolution=resolution,
            attack=attack if cfg.recipe == "delta" else None, clean_loss_weight=cfg.clean_loss_weight,
            local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
        )

    weights_io = OpenClipWeights(
        clip, unwrap(model).state_dict().keys(), {"recipe": cfg.recipe, "config": to_dict(cfg)}
    )

    def export(final: Path) -> None:
        resolution.set(resolution.native)
        state = full_model_state(model)
        if env.is_main:
            export_final(weights_io, state, final)

    return Job(
        model=model, groups=parameter_groups(model, cfg.weight_decay), loss_fn=loss_fn,
        make_loader=make_loader_factory(dataset, cfg=cfg, env=env, collate=collate), data_name=cfg.data,
        steps=cfg.steps, warmup_steps=cfg.warmup_steps,
        fingerprint={"recipe": cfg.recipe, "model": clip.model_name, "steps": cfg.steps},
        description=f"{cfg.recipe} clip", export=export,
        segment_length=cfg.checkpoint_every * cfg.accum_steps if cfg.resampled else None,
        eval_every=cfg.eval_every, evaluate=make_evaluator(cfg, clip, resolution, env, model),
        save_weights=weights_io.save, load_weights=weights_io.load,
    )


def _fsdp_units(clip: DvdCLIP) -> list[nn.Module]:
    """Transformer blocks of both towers: FSDP shards each as a unit."""
    units = []
    for tower in (getattr(clip.model.visual, "transformer", None), getattr(clip.model, "transformer", None)):
        blocks = getattr(tower, "resblocks", None)
        if blocks is not None:
            units.extend(blocks)
    return units


def cli(argv: Sequence[str]) -> int:
    """``dvd train clip --config FILE.yaml [key=value ...]``"""
    return training_cli(
        argv,
        prog="dvd train clip",
        description="ΔCLIP adversarial pre-training, clean CLIP, TeCoA and FARE fine-tuning; torchrun-ready.",
        config_cls=ClipTrainConfig,
        train=train_clip,
        summary_keys=("step", "steps", "skipped_steps", "final", "resumed_from"),
        recipes="configs/clip_*.yaml",
    )


if __name__ == "__main__":
    raise SystemExit(cli(sys.argv[1:]))
