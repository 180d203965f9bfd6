"""The training settings ``dvd train clip`` and ``dvd train vlm`` share, with one meaning and one default.

Each trainer's config subclasses :class:`CommonTrainConfig` and adds its own data, model, optimiser and
attack keys (their published defaults differ: CLIP's AdamW β2 0.98 and weight decay 0.2, LLaVA's 0.999
and 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from dvd.config import ConfigError, positive_int


@dataclass
class CommonTrainConfig:
    """Where and how each step runs, and the bookkeeping of a run (YAML keys of both trainers)."""

    adam_beta1: float = 0.9
    grad_clip: float | None = 1.0
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    distributed: str = "ddp"  # ddp | fsdp
    grad_checkpointing: bool = False
    seed: int = 0
    # bookkeeping
    keep_last: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    branch_from: str | None = None  # a fresh run starts from another run's checkpoint folder (see run_job)
    stop_at: int | None = None  # end this invocation at this step, checkpointed (time-limited jobs)
    log_every: int = 10
    max_nonfinite_in_a_row: int = 10
    progress: bool = True


def check_common(cfg: CommonTrainConfig) -> None:
    """One-line errors for the shared keys."""
    for name in ("keep_last", "max_nonfinite_in_a_row"):
        positive_int(getattr(cfg, name), name)
    if int(cfg.log_every) < 0:
        raise ConfigError(f"log_every must be >= 0, got {cfg.log_every}")
    if cfg.distributed not in ("ddp", "fsdp"):
        raise ConfigError(f"distributed {cfg.distributed!r} is not one of ddp, fsdp")


def check_length(cfg: CommonTrainConfig) -> None:
    """One-line errors for a run's length: ``batch_size``, ``accum_steps`` and ``checkpoint_every`` >= 1,
    ``steps`` >= 1 or, unset, ``epochs`` > 0 (the keys of the trainers that count in epochs)."""
    for name in ("batch_size", "accum_steps", "checkpoint_every"):
        positive_int(getattr(cfg, name), name)
    steps, epochs = getattr(cfg, "steps", None), getattr(cfg, "epochs", None)
    if steps is not None:
        positive_int(steps, "steps")
    elif not epochs > 0:
        raise ConfigError(f"epochs must be > 0, got {epochs}")
