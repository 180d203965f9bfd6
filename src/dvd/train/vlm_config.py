"""What ``dvd train vlm`` takes: :class:`VlmTrainConfig` (YAML file + ``key=value`` overrides) and its
checks, one-line errors naming the fix."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from dvd.config import ConfigError, parse_eps, positive_int
from dvd.models.vlm_conversation import get_template
from dvd.train.common_config import CommonTrainConfig, check_common, check_length

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the demo's language model: a tiny random Llama (vocabulary size and special ids come from the tokenizer)
TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
}


@dataclass
class VlmTrainConfig(CommonTrainConfig):
    """Everything ``dvd train vlm`` takes (YAML file + ``key=value`` overrides); the shared runtime and
    bookkeeping keys are :class:`CommonTrainConfig`'s."""

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
    augment: bool = False  # fixed resize + centre crop (LLaVA's preprocessing is fixed); true: random crops
    in_memory: bool = False  # decode the images once and keep them (sets that fit in RAM); augment=false
    # batches of conversations of similar length (less padding; Hugging Face's / LLaVA's group_by_length)
    group_by_length: bool = False
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
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
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
    check_common(cfg)
    check_length(cfg)
    for name in ("workers", "eps_warmup_steps"):
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
