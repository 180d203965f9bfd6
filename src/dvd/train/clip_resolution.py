"""The CLIPA / AdvXL resolution schedule of ``dvd train clip``: low-resolution phases, each with its own
number of attack steps, and a full-size positional embedding interpolated to the current grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from dvd.config import ConfigError, positive_int
from dvd.models.clip import DvdCLIP
from dvd.train.clip_config import ClipTrainConfig


@dataclass(frozen=True)
class Phase:
    """``steps`` optimizer steps from ``start`` at ``image_size`` px with PGD-``attack_steps``."""

    start: int
    steps: int
    image_size: int
    attack_steps: int


def build_phases(cfg: ClipTrainConfig, clip: DvdCLIP) -> list[Phase]:
    """The schedule from ``cfg.phases`` (or one phase at the model's size); steps must add up."""
    native = clip.image_size
    if not cfg.phases:
        return [Phase(0, cfg.steps, native, int(cfg.attack_steps or 0))]
    patch = _patch_size(clip)
    phases, start = [], 0
    for i, item in enumerate(cfg.phases):
        if not isinstance(item, dict):
            raise ConfigError(
                f"phases[{i}] must be a mapping like {{steps: 100, image_size: 112, attack_steps: 1}}"
            )
        unknown = set(item) - {"steps", "image_size", "attack_steps"}
        if unknown:
            raise ConfigError(
                f"phases[{i}] has unknown key {sorted(unknown)[0]!r} (use steps, image_size, attack_steps)"
            )
        steps = positive_int(item.get("steps"), f"phases[{i}].steps")
        size = positive_int(item.get("image_size", native), f"phases[{i}].image_size")
        attack = int(item.get("attack_steps", cfg.attack_steps or 0))
        if size > native or size % patch:
            raise ConfigError(
                f"phases[{i}].image_size={size} must be a multiple of the patch size {patch} and at most the "
                f"model's {native} px"
            )
        if attack < 0 or (cfg.recipe == "clean" and attack > 0):
            raise ConfigError(f"phases[{i}].attack_steps={attack} is invalid for recipe {cfg.recipe}")
        if size != native and cfg.recipe not in ("clean", "delta"):
            raise ConfigError(f"low-resolution phases are for pre-training (clean, delta), not {cfg.recipe}")
        phases.append(Phase(start, steps, size, attack))
        start += steps
    if start != cfg.steps:
        raise ConfigError(f"phases add up to {start} steps but steps={cfg.steps}; make them equal")
    return phases


def phase_at(phases: Sequence[Phase], step: int) -> Phase:
    for phase in phases:
        if step < phase.start + phase.steps:
            return phase
    return phases[-1]


def _patch_size(clip: DvdCLIP) -> int:
    patch = getattr(clip.model.visual, "patch_size", None)
    if patch is None:
        raise ConfigError(
            f"{clip.model_name} has no ViT patch grid; resolution phases need a ViT image tower"
        )
    return int(patch[0] if isinstance(patch, tuple) else patch)


class InterpolatedPositions(nn.Module):
    """Parametrization: the full-size (1 + g*g, D) positional embedding resized to the current grid.

    The class-token row is kept; the grid rows are bilinearly interpolated. At the native grid it is
    the identity, so the parameter (and what is saved) always has the model's full size.
    """

    def __init__(self, native_grid: tuple[int, int]) -> None:
        super().__init__()
        self.native = tuple(native_grid)
        self.grid = tuple(native_grid)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        if self.grid == self.native:
            return pos
        extra = pos.shape[0] - self.native[0] * self.native[1]
        tokens, grid = pos[:extra], pos[extra:]
        grid = grid.reshape(1, *self.native, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=self.grid, mode="bilinear", align_corners=False, antialias=True)
        return torch.cat([tokens, grid.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])])


class Resolution:
    """Switches a CLIP's image tower between its native and lower resolutions."""

    def __init__(self, clip: DvdCLIP, phases: Sequence[Phase]) -> None:
        self.clip = clip
        self.native = clip.image_size
        self.current = clip.image_size
        self.positions: InterpolatedPositions | None = None
        if any(p.image_size != self.native for p in phases):
            visual = clip.model.visual
            self.patch = _patch_size(clip)
            self.positions = InterpolatedPositions(tuple(visual.grid_size))
            parametrize.register_parametrization(visual, "positional_embedding", self.positions, unsafe=True)

    def set(self, image_size: int) -> None:
        if self.positions is not None:
            self.positions.grid = (image_size // self.patch, image_size // self.patch)
        self.current = image_size

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """Downsample [0, 1] images loaded at the native size to the current one."""
        if images.shape[-1] == self.current and images.shape[-2] == self.current:
            return images
        resized = F.interpolate(
            images, size=(self.current, self.current), mode="bilinear", align_corners=False, antialias=True
        )
        return resized.clamp(0, 1)
