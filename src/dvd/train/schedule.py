"""What each optimizer step follows: the cosine lr schedule with warm-up, and the guard that skips and
counts non-finite steps (stopping the run after too many in a row).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dvd.config import ConfigError


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the message names the step."""




# the schedule's settings, by the config key that sets them
SCHEDULE_KEYS = {"total_steps": "steps", "warmup_steps": "warmup_steps", "min_lr_ratio": "min_lr_ratio",
                 "base_lrs": "lr"}
FIXED_AT_START = (
    "the lr schedule is fixed when a run starts; use the same value, or train longer from this run's "
    "final model in a fresh output_dir"
)


class CosineSchedule:
    """Linear warm-up to each group's base lr, then cosine decay to ``min_lr_ratio`` x base.

    The lr is a function of the step alone, so a resumed run (or a skipped step) cannot drift.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if total_steps < 1:
            raise ConfigError(f"total steps must be >= 1, got {total_steps}")
        if warmup_steps < 0:
            raise ConfigError(f"warm-up steps must be >= 0, got {warmup_steps}")
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.step_index = 0

    def factor(self, step: int) -> float:
        """The multiplier of the base lr at ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def apply(self, step: int) -> float:
        """Set every group's lr for ``step``; returns the first group's."""
        self.step_index = step
        factor = self.factor(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        return self.base_lrs[0] * factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "base_lrs": list(self.base_lrs),
            "step": self.step_index,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved step; a schedule configured otherwise than the saved one is refused
        (it would be silently ignored: the lr is a function of the step and these settings)."""
        configured = self.state_dict()
        for key, name in SCHEDULE_KEYS.items():
            if state[key] != configured[key]:
                raise ConfigError(
                    f"the checkpoint was trained with {name}={state[key]} but this run has "
                    f"{name}={configured[key]}: {FIXED_AT_START}"
                )
        self.step_index = int(state["step"])


class NonFiniteGuard:
    """Counts skipped (non-finite) steps; too many in a row stop the run naming the step."""

    def __init__(self, max_in_a_row: int = 10) -> None:
        if max_in_a_row < 1:
            raise ConfigError(f"max non-finite steps in a row must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.skipped = 0
        self.in_a_row = 0

    def record(self, step: int, finite: bool, what: str = "loss or gradient") -> None:
        """Note one step's outcome; raise :class:`TrainingDiverged` after too many bad ones in a row."""
        if finite:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingDiverged(
                f"stopping at step {step}: non-finite {what} in {self.in_a_row} steps in a row "
                f"({self.skipped} skipped in all); lower the lr, raise warm-up or use precision=fp32"
            )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row, "max_in_a_row": self.max_in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = int(state["skipped"])
        self.in_a_row = int(state["in_a_row"])
