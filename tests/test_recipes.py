"""Every YAML recipe in configs/ still loads, validates and trains a step with a tiny override,
so the paper-scale recipes cannot rot while only the demo ones are run."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvd.config import load_config
from dvd.train.clip import train_clip
from dvd.train.clip_config import ClipTrainConfig, check_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLIP_RECIPES = sorted(CONFIGS.glob("clip_*.yaml"))


@pytest.fixture(scope="module")
def clean_start(shapesworld: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    cfg = load_config(
        ClipTrainConfig,
        CONFIGS / "clip_clean_demo.yaml",
        ["model=dvd-tiny-vit", f"data={shapesworld}", f"output_dir={out}", "steps=1", "batch_size=4",
         "progress=false", "eval_every=0", "warmup_steps=0", "shuffle_buffer=8"],
    )
    train_clip(check_config(cfg))
    return out / "final"


def _tiny_overrides(path: Path, shapesworld: Path, out: Path, clean_start: Path) -> list[str]:
    raw = load_config(ClipTrainConfig, path)
    overrides = [
        "model=dvd-tiny-vit", f"data={shapesworld}", "data_format=shapesworld", f"output_dir={out}",
        "batch_size=4", "workers=0", "progress=false", "eval_every=0", "warmup_steps=0",
        "eps_warmup_steps=0", "shuffle_buffer=8", "precision=fp32", "device=cpu",
        "grad_checkpointing=false", "checkpoint_every=1",
    ]
    if raw.phases:  # keep the schedule's shape (low-res PGD-k, then full-res PGD-k') at the tiny size
        low, *rest = raw.phases
        phases = [{"steps": 1, "image_size": 16, "attack_steps": low["attack_steps"]}]
        phases += [{"steps": 1, "image_size": 32, "attack_steps": p["attack_steps"]} for p in rest]
        overrides += [f"phases={phases}", f"steps={len(phases)}"]
    else:
        overrides.append("steps=1")
    if raw.recipe in ("tecoa", "fare"):
        overrides.append(f"pretrained={clean_start}")
    return overrides


@pytest.mark.parametrize("path", CLIP_RECIPES, ids=lambda p: p.stem)
def test_every_clip_recipe_trains_a_step_with_a_tiny_override(path, shapesworld, clean_start, tmp_path):
    out = tmp_path / "run"
    overrides = _tiny_overrides(path, shapesworld, out, clean_start)
    cfg = check_config(load_config(ClipTrainConfig, path, overrides))
    summary = train_clip(cfg)
    assert summary["final"] and (out / "final" / "open_clip_model.safetensors").is_file()
