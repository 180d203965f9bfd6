"""``dvd train vlm``: LLaVA-style two-stage training, clean or Δ² (adversarial visual instruction tuning).

- ``stage: 1``  feature alignment: only the projector trains, on captions (LLaVA's ``plain`` template:
  the image, then the caption).
- ``stage: 2``  instruction tuning from a stage-1 model (``init``): projector + language model (full or
  ``lora``), the vision tower optionally (``train_vision``), each part with its own learning rate.
- ``adversarial: true``  Δ²: every batch is replaced by PGD images that maximise each sample's answer
  NLL (see :mod:`dvd.train.vlm_step`); the paper runs it in both stages.

A fresh model is an open_clip vision tower (a dvd CLIP checkpoint folder such as a ΔCLIP, an open_clip
name or model-config JSON) + a ``mlp2x_gelu`` projector + a Hugging Face causal LM (a name, or a config
dict: a tiny Llama by default) with the LM's tokenizer, or the small world's (``tokenizer: shapesworld``).
The loop, distributed setup (torchrun DDP / FSDP2), bf16 autocast, checkpoint/resume and logging are
:mod:`dvd.train.loop`'s, shared with ``dvd train clip``. The trained model is ``OUTPUT_DIR/final``
(:func:`dvd.models.vlm.save_vlm`, LoRA merged), the ``init`` of the next stage.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from dvd.config import ConfigError, parse_eps, positive_int, to_dict
from dvd.io import versions, write_json
from dvd.models.vlm import save_vlm
from dvd.models.vlm_conversation import get_template
from dvd.train.attack import AttackSettings
from dvd.train.clip_data import make_loader_factory
from dvd.train.command import training_cli
from dvd.train.loop import (
    CheckpointManager,
    CosineSchedule,
    DataStream,
    DistEnv,
    LoopSettings,
    MetricLogger,
    NonFiniteGuard,
    TrainingDiverged,
    adamw,
    barrier,
    fit,
    full_model_state,
    grad_scaler,
    is_fsdp,
    non_finite_tensors,
    resolve_precision,
    restore,
    seed_everything,
    setup_distributed,
    teardown_distributed,
    unwrap,
    wrap_model,
)
from dvd.train.output import claim_output_dir
from dvd.train.vlm_data import DataSource, build_conversations, resolve_source
from dvd.train.vlm_model import DTYPES, TINY_LLAMA, build_vlm, fsdp_units, merge_lora, optimizer_groups
from dvd.train.vlm_step import InstructionLoss, InstructionStep


@dataclass
class VlmTrainConfig:
    """Everything ``dvd train vlm`` takes (YAML file + ``key=value`` overrides)."""

    stage: int = 2
    adversarial: bool = False
    output_dir: str = "runs/vlm"
    # model: ``init`` (a save_vlm folder, a stage-1 output_dir, or hf-llava:NAME) or built fresh
    init: str | None = None
    vision: str = "dvd-tiny-vit"  # dvd CLIP checkpoint folder, open_clip name, model-config JSON, hf-hub: tag
    vision_pretrained: str | None = None
    feature_layer: int = -2
    lm: str | dict[str, Any] = field(default_factory=lambda: dict(TINY_LLAMA))  # HF name/path or config dict
    lm_dtype: str | None = (
        None  # bf16 | fp16 | fp32 frozen weights (default: as loaded); trained ones stay fp32
    )
    tokenizer: str | None = "shapesworld"  # shapesworld[:ROOT], a name/path, or None: the LM's own
    template: str | None = None  # conversation template of the model (default: vicuna_v1, or the init's)
    data_template: str | None = None  # template of the training data (default: plain in stage 1)
    # data
    data: str = ""  # ShapesWorld root, LLaVA JSON (list), COCO captions or Karpathy split JSON (objects)
    data_format: str = "auto"  # auto | shapesworld | llava | coco | karpathy
    image_root: str | None = None  # folder the JSON's image paths are relative to
    caption_prompt: str = "Describe the image briefly."  # the question of COCO caption samples
    max_length: int | None = 2048
    workers: int = 0
    # what trains
    train_lm: bool | None = None  # default: stage 2 only
    train_vision: bool = False
    lora: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    # optimisation
    steps: int | None = None  # default: ``epochs`` passes over the data
    epochs: float = 1.0
    batch_size: int = 16  # per process and micro-batch
    accum_steps: int = 1
    lr: float = 2e-4  # language model (stage 2) and default of the others
    projector_lr: float | None = None
    vision_lr: float | None = None
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None  # overrides warmup_ratio
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    distributed: str = "ddp"  # ddp | fsdp
    grad_checkpointing: bool = False
    seed: int = 0
    # Δ² attack
    eps: str = "4/255"
    attack_steps: int = 3
    attack_step_size: str = "3/255"
    random_start: bool = True
    attack_loss_scale: float = 128.0
    attack_mode: str = "train"  # train keeps HF activation checkpointing on during the attack
    eps_warmup_steps: int = 0
    # bookkeeping
    checkpoint_every: int = 100
    keep_last: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    stop_at: int | None = None
    log_every: int = 10
    max_nonfinite_in_a_row: int = 10
    progress: bool = True


def check_config(cfg: VlmTrainConfig) -> VlmTrainConfig:
    """Validate and fill stage-dependent defaults; one-line errors naming the fix."""
    if cfg.stage not in (1, 2):
        raise ConfigError(f"stage must be 1 (projector, captions) or 2 (instruction tuning), got {cfg.stage}")
    if cfg.train_lm is None:
        cfg.train_lm = cfg.stage == 2
    if cfg.stage == 1 and (cfg.train_lm or cfg.train_vision or cfg.lora):
        raise ConfigError(
            "stage 1 trains only the projector; use stage=2 to train the LM or the vision tower"
        )
    if cfg.lora and not cfg.train_lm:
        raise ConfigError("lora=true adapts the language model; set train_lm=true (or lora=false)")
    for name in ("batch_size", "accum_steps", "checkpoint_every", "keep_last", "max_nonfinite_in_a_row"):
        positive_int(getattr(cfg, name), name)
    if cfg.steps is not None:
        positive_int(cfg.steps, "steps")
    elif not cfg.epochs > 0:
        raise ConfigError(f"epochs must be > 0, got {cfg.epochs}")
    for name in ("workers", "log_every", "eps_warmup_steps"):
        if int(getattr(cfg, name)) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("lr", "projector_lr", "vision_lr"):
        value = getattr(cfg, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{name} must be a positive number, got {value}")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise ConfigError(f"weight_decay must be a number >= 0, got {cfg.weight_decay}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.lm_dtype is not None and cfg.lm_dtype not in DTYPES:
        raise ConfigError(f"lm_dtype {cfg.lm_dtype!r} is not one of {', '.join(DTYPES)}")
    if cfg.distributed not in ("ddp", "fsdp"):
        raise ConfigError(f"distributed {cfg.distributed!r} is not one of ddp, fsdp")
    if cfg.attack_mode not in ("train", "eval"):
        raise ConfigError(f"attack_mode {cfg.attack_mode!r} is not one of train, eval")
    if cfg.max_length is not None:
        positive_int(cfg.max_length, "max_length")
    for name in (cfg.template, cfg.data_template):
        if name is not None:
            get_template(name)
    parse_eps(cfg.eps)
    parse_eps(cfg.attack_step_size)
    if cfg.adversarial:
        positive_int(cfg.attack_steps, "attack_steps")
    if cfg.lora:
        positive_int(cfg.lora_r, "lora_r")
    return cfg


# ---------------------------------------------------------------------------------------------
# the job


def train_vlm(cfg: VlmTrainConfig) -> dict[str, Any]:
    """Run one ``dvd train vlm`` job (single process or under torchrun); returns a summary."""
    cfg = check_config(cfg)
    env = setup_distributed(cfg.device)
    try:
        with claim_output_dir(cfg.output_dir, env):
            return _train(cfg, env)
    finally:
        teardown_distributed()


def _train(cfg: VlmTrainConfig, env: DistEnv) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    precision = resolve_precision(cfg.precision, env.device)
    source = resolve_source(cfg.data, cfg.data_format, cfg.image_root, cfg.stage)
    vlm = build_vlm(cfg, source, env.device)
    data_template = cfg.data_template or ("plain" if cfg.stage == 1 else None)
    collator = vlm.collator(max_length=cfg.max_length, template=data_template)
    dataset = build_conversations(
        source, image_size=vlm.image_size, collator=collator, caption_prompt=cfg.caption_prompt
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
        )  # fmt: skip
    loss_fn = InstructionLoss(
        model=model, vlm=vlm, env=env, attack=attack, attack_steps=cfg.attack_steps,
        loss_scale=cfg.attack_loss_scale,
    )  # fmt: skip
    lrs = {"lm": cfg.lr, "projector": cfg.projector_lr or cfg.lr, "vision": cfg.vision_lr or cfg.lr}
    optimizer = adamw(
        model, optimizer_groups(vlm, lrs=lrs, weight_decay=cfg.weight_decay),
        lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
    )  # fmt: skip
    schedule = CosineSchedule(
        optimizer, warmup_steps=warmup, total_steps=steps, min_lr_ratio=cfg.min_lr_ratio
    )
    guard = NonFiniteGuard(cfg.max_nonfinite_in_a_row)
    scaler = grad_scaler(precision, env.device)
    stream = DataStream(
        make_loader_factory(dataset, cfg=cfg, env=env, collate=collator),
        env,
        name=str(source.path),
        seed=cfg.seed,
    )
    checkpoints = CheckpointManager(
        out / "checkpoints", env, keep_last=cfg.keep_last, config=to_dict(cfg),
        fingerprint={"stage": cfg.stage, "adversarial": cfg.adversarial, "lora": cfg.lora,
                     "vocab_size": len(vlm.tokenizer), "steps": steps},
    )  # fmt: skip
    start = 0
    resume_from = checkpoints.resolve(cfg.resume)
    if resume_from is not None:
        start, _ = restore(
            checkpoints, resume_from, model=model, optimizer=optimizer, schedule=schedule, stream=stream,
            guard=guard, scaler=scaler,
        )  # fmt: skip
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {"config": to_dict(cfg), "steps": steps, "warmup_steps": warmup,
                                         "precision": precision, "world_size": env.world_size,
                                         "versions": versions()})  # fmt: skip
    kind = "Δ²" if cfg.adversarial else "clean"
    logger = MetricLogger(
        out / "tensorboard", env, total=steps, start=start, progress=cfg.progress,
        description=f"stage {cfg.stage} {kind} vlm",
    )  # fmt: skip
    try:
        result = fit(
            model=model, optimizer=optimizer, schedule=schedule, stream=stream, loss_fn=loss_fn,
            settings=LoopSettings(steps=steps, accum_steps=cfg.accum_steps, grad_clip=cfg.grad_clip,
                                  precision=precision, checkpoint_every=cfg.checkpoint_every,
                                  log_every=cfg.log_every, stop_at=cfg.stop_at),
            env=env, checkpoints=checkpoints, logger=logger, guard=guard, scaler=scaler, start_step=start,
        )  # fmt: skip
    finally:
        logger.close()
    finished = result.step >= steps
    final = out / "final"
    if finished:  # a stopped (stop_at) run leaves only its checkpoint
        export_final(cfg, model, source, final, env)
    summary = {
        "step": result.step, "steps": steps, "skipped_steps": result.skipped,
        "final": str(final) if finished else None, "resumed_from": start,
        "seconds": round(result.seconds, 3), "skipped_samples": dataset.skipped, "last": result.last,
    }  # fmt: skip
    if env.is_main:
        write_json(out / "summary.json", summary)
    barrier(env)
    return summary


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
    cfg: VlmTrainConfig, model: nn.Module, source: DataSource, final: Path, env: DistEnv
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
