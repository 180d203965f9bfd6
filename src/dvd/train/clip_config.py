"""What ``dvd train clip`` takes: :class:`ClipTrainConfig` (YAML file + ``key=value`` overrides) and
its checks, one-line errors naming the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from dvd.config import ConfigError, parse_eps, positive_int, suggest
from dvd.train.common_config import CommonTrainConfig, check_common

RECIPES = ("clean", "delta", "tecoa", "fare")
# per-channel mean/std a recipe may normalise with (open_clip's constants); "model" keeps the model's own
NORMALIZATIONS = {
    "openai": (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}
DATA_FORMATS = ("auto", "shapesworld", "webdataset", "csv", "zeroshot")
SHAPESWORLD_TASKS = ("shape", "color", "count", "size", "texture")


@dataclass
class ClipTrainConfig(CommonTrainConfig):
    """Everything ``dvd train clip`` takes (YAML file + ``key=value`` overrides); the shared runtime and
    bookkeeping keys are :class:`CommonTrainConfig`'s."""

    recipe: str = "delta"
    model: str = "dvd-tiny-vit"  # open_clip name, model-config JSON, hf-hub: tag or checkpoint folder
    pretrained: str | None = None  # tecoa/fare start: checkpoint folder, open_clip tag or weights file
    normalization: str = "model"  # mean/std inside the model: model (its config's), openai or imagenet
    output_dir: str = "runs/clip"
    # data
    data: str = ""  # ShapesWorld root, webdataset shards (brace lists, '::', pipe:), CSV/TSV, zero-shot root
    data_format: str = "auto"
    resampled: bool = False
    shuffle_buffer: int = 1000
    augment: bool = True  # open_clip's RandomResizedCrop(scale 0.9-1); false: images as they are, resized
    # read and decode the whole training set once, keep it in RAM (8-bit) and read each epoch in a seeded
    # order: sets that fit in RAM (ShapesWorld); needs augment=false, resampled=false, batch_group_by []
    in_memory: bool = False
    # hard-negative batches (clean/delta on shards with KEY.json): this share of the batches holds samples
    # that agree on these KEY.json attributes, e.g. [color] (dvd.train.clip_groups); [] = random batches
    batch_group_by: list[str] = field(default_factory=list)
    batch_group_prob: float = 0.5
    # samples per group (a divisor of batch_size; 0 = the whole batch), and attributes of batch_group_by of
    # which each grouped sample leaves one out of its group's key (minimal pairs: groups differ in it alone)
    batch_group_size: int = 0
    batch_group_free: list[str] = field(default_factory=list)
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = "\t"
    csv_image_root: str | None = None  # relative CSV image paths resolve here (default: the working dir)
    task: str = "shape"  # tecoa on ShapesWorld: the attribute whose labels are learned
    split: str = "train"  # tecoa on a zero-shot layout: which split holds the training images
    workers: int = 0
    # optimisation
    steps: int = 100
    batch_size: int = 32  # per process and micro-batch
    accum_steps: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.2
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    local_loss: bool = True
    gather_with_grad: bool = True
    # attack
    eps: str = "4/255"
    attack_steps: int | None = None  # default: 2 for delta, 10 for tecoa/fare, 0 for clean
    attack_step_size: str | None = None  # default: 2.5 eps / max(K, 2) for delta, 1/255 for tecoa/fare
    random_start: bool = True
    eps_warmup_steps: int = 0
    clean_loss_weight: float = 0.0
    attack_mode: str = "eval"  # eval | train
    phases: list[dict[str, int]] = field(default_factory=list)  # [{steps, image_size, attack_steps}]
    # bookkeeping
    checkpoint_every: int = 50
    # periodic zero-shot evaluation on ShapesWorld tasks (clean + short PGD)
    eval_every: int = 0
    eval_data: str | None = None  # ShapesWorld root; default: ``data`` when it is one
    eval_tasks: list[str] = field(default_factory=lambda: list(SHAPESWORLD_TASKS))
    eval_samples: int = 100
    eval_eps: str = "4/255"
    eval_attack_steps: int = 10
    eval_batch_size: int = 100





def check_config(cfg: ClipTrainConfig) -> ClipTrainConfig:
    """Validate and fill recipe-dependent defaults; one-line errors naming the fix."""
    if cfg.recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {cfg.recipe!r}{suggest(cfg.recipe, RECIPES)}")
    if cfg.data_format not in DATA_FORMATS:
        raise ConfigError(f"unknown data_format {cfg.data_format!r}{suggest(cfg.data_format, DATA_FORMATS)}")
    if cfg.attack_mode not in ("eval", "train"):
        raise ConfigError(f"attack_mode {cfg.attack_mode!r} is not one of eval, train")
    if cfg.normalization != "model" and cfg.normalization not in NORMALIZATIONS:
        choices = ("model", *NORMALIZATIONS)
        raise ConfigError(f"unknown normalization {cfg.normalization!r}{suggest(cfg.normalization, choices)}")
    if not cfg.data:
        raise ConfigError("no training data; set data=DIR (ShapesWorld root), shard urls or a CSV file")
    check_common(cfg)
    for name in ("steps", "batch_size", "accum_steps", "checkpoint_every"):
        positive_int(getattr(cfg, name), name)
    for name in ("workers", "warmup_steps", "eps_warmup_steps", "eval_every", "shuffle_buffer"):
        if int(getattr(cfg, name)) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        raise ConfigError(f"lr must be a positive number, got {cfg.lr}")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise ConfigError(f"weight_decay must be a number >= 0, got {cfg.weight_decay}")
    if cfg.in_memory:
        clash = [name for name, on in (("augment", cfg.augment), ("resampled", cfg.resampled),
                                        ("batch_group_by", bool(cfg.batch_group_by))) if on]
        if clash:
            raise ConfigError(
                f"in_memory=true reads the set once and keeps each image as transformed then, which "
                f"{' and '.join(clash)} cannot work with; turn it off or set in_memory=false"
            )
    if cfg.clean_loss_weight < 0:
        raise ConfigError(f"clean_loss_weight must be >= 0, got {cfg.clean_loss_weight}")
    if cfg.recipe in ("tecoa", "fare") and cfg.pretrained is None and not Path(cfg.model).is_dir():
        raise ConfigError(
            f"recipe {cfg.recipe} fine-tunes a pre-trained CLIP; set pretrained=DIR (a dvd checkpoint "
            "folder), an open_clip tag or a weights file"
        )
    if not 0.0 <= cfg.batch_group_prob <= 1.0:
        raise ConfigError(f"batch_group_prob must be in [0, 1], got {cfg.batch_group_prob}")
    if cfg.batch_group_size < 0 or (cfg.batch_group_size and cfg.batch_size % cfg.batch_group_size):
        raise ConfigError(
            f"batch_group_size must divide batch_size {cfg.batch_size} (or be 0: whole batches), "
            f"got {cfg.batch_group_size}"
        )
    stray = [k for k in cfg.batch_group_free if k not in cfg.batch_group_by]
    if stray:
        raise ConfigError(f"batch_group_free {stray} not in batch_group_by {cfg.batch_group_by}; add them")
    parse_eps(cfg.eps)
    parse_eps(cfg.eval_eps)
    if cfg.attack_steps is None:
        cfg.attack_steps = {"clean": 0, "delta": 2, "tecoa": 10, "fare": 10}[cfg.recipe]
    if cfg.attack_steps < 0:
        raise ConfigError(f"attack_steps must be >= 0, got {cfg.attack_steps}")
    if cfg.recipe == "clean" and cfg.attack_steps > 0:
        raise ConfigError("recipe clean does not attack; use recipe=delta for adversarial training")
    if cfg.recipe != "clean" and cfg.attack_steps == 0 and not cfg.phases:
        raise ConfigError(f"recipe {cfg.recipe} needs attack_steps >= 1 (0 is clean training: recipe=clean)")
    for task in cfg.eval_tasks:
        if task not in SHAPESWORLD_TASKS:
            raise ConfigError(f"unknown ShapesWorld task {task!r}{suggest(task, SHAPESWORLD_TASKS)}")
    return cfg
