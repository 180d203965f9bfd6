"""Saving and loading VLMs: :func:`save_vlm` writes a folder (replaced atomically) with safetensors
weights, the LM config and tokenizer, and ``dvd_vlm.json`` (the recipe); :func:`load_vlm` restores a
:class:`dvd.models.vlm.DvdVLM` or an HF LLaVA adapter (:class:`dvd.models.vlm_hf.HFLlava`) from one.
Only safetensors weights are read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from dvd.config import ConfigError
from dvd.io import read_json, versions, write_json
from dvd.models.llava_original import is_llava_original, load_llava_original
from dvd.models.vlm import DvdVLM, MLPProjector, VisionTower
from dvd.models.vlm_base import VisionLanguageModel
from dvd.models.vlm_conversation import ConversationTemplate
from dvd.models.vlm_hf import HFLlava, load_saved_hf_llava, save_hf_llava

RECIPE_NAME = "dvd_vlm.json"
FORMAT = "dvd-vlm"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def save_vlm(
    model: VisionLanguageModel, directory: str | Path, *, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` to ``directory`` (replaced atomically): safetensors weights, the LM config and
    tokenizer via ``save_pretrained``, and ``dvd_vlm.json`` (the recipe, package versions, ``metadata``)."""
    for part in ("lm", "hf"):
        if hasattr(getattr(model, part, None), "peft_config"):
            raise ConfigError(
                f"merge LoRA weights before saving: model.{part} = model.{part}.merge_and_unload()"
            )
    directory = Path(directory)

    def write(tmp: Path) -> dict[str, Any]:
        if isinstance(model, HFLlava):
            recipe = save_hf_llava(model, tmp)
        elif isinstance(model, DvdVLM):
            recipe = _save_dvd_vlm(model, tmp)
        else:
            raise ConfigError(f"cannot save a {type(model).__name__}; expected DvdVLM or HFLlava")
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        return recipe

    return _write_directory(directory, write, metadata)


def _save_dvd_vlm(model: DvdVLM, tmp: Path) -> dict[str, Any]:
    vision = model.vision_tower.recipe()
    save_file(_tensors(model.vision_tower), str(tmp / "vision_tower.safetensors"))
    save_file(_tensors(model.projector), str(tmp / "projector.safetensors"))
    model.lm.save_pretrained(tmp / "lm", safe_serialization=True)
    return {
        "kind": "dvd",
        "vision": vision,
        "projector": {
            "type": "mlp2x_gelu",
            "in_features": model.projector.in_features,
            "out_features": model.projector.out_features,
        },
        "lm": {"dir": "lm", "class": type(model.lm).__name__},
        "template": model.template.to_dict(),
    }


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _write_directory(
    directory: Path, write: Callable[[Path], dict[str, Any]], metadata: Mapping[str, Any] | None
) -> Path:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        recipe = write(tmp)
        recipe = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **recipe,
            "tokenizer": "tokenizer",
            "metadata": dict(metadata or {}),
            "versions": versions(),
        }
        write_json(tmp / RECIPE_NAME, recipe)
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
            os.replace(directory, old / directory.name)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_vlm(
    directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> VisionLanguageModel:
    """Restore a model written by :func:`save_vlm` (a :class:`DvdVLM` or an HF LLaVA adapter), in eval mode.

    Only safetensors weights are read; a directory holding pickled weights is refused. A full LLaVA in its
    authors' layout goes to :func:`dvd.models.llava_original.load_llava_original`.
    """
    if is_llava_original(directory):
        return load_llava_original(directory, device=device, dtype=dtype)
    directory = Path(directory)
    recipe = read_json(directory / RECIPE_NAME)
    if recipe.get("format") != FORMAT:
        raise ValueError(
            f"{directory / RECIPE_NAME} is not a dvd VLM recipe (format {recipe.get('format')!r})"
        )
    pickles = sorted(p.name for p in directory.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{directory} holds pickled weights ({', '.join(pickles)}); only safetensors are loaded"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory / recipe.get("tokenizer", "tokenizer"))
    if recipe.get("kind") == "hf-llava":
        model: VisionLanguageModel = load_saved_hf_llava(directory, recipe, tokenizer, dtype=dtype)
    elif recipe.get("kind") == "dvd":
        model = _load_dvd_vlm(directory, recipe, tokenizer, dtype)
    else:
        raise ValueError(f"{directory / RECIPE_NAME}: unknown model kind {recipe.get('kind')!r}")
    return model.to(device).eval()


def _load_dvd_vlm(
    directory: Path, recipe: dict[str, Any], tokenizer: Any, dtype: torch.dtype | None
) -> DvdVLM:
    tower = VisionTower.from_recipe(recipe["vision"])
    tower.load_state_dict(_read_safetensors(directory / "vision_tower.safetensors"))
    spec = recipe["projector"]
    if spec.get("type") != "mlp2x_gelu":
        raise ValueError(f"{directory}: unknown projector type {spec.get('type')!r}")
    projector = MLPProjector(spec["in_features"], spec["out_features"])
    projector.load_state_dict(_read_safetensors(directory / "projector.safetensors"))
    lm_dir = directory / recipe["lm"]["dir"]
    if not any(lm_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{lm_dir}: no safetensors weights")
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, **kwargs)
    if dtype is not None:
        tower.to(dtype)
        projector.to(dtype)
    template = ConversationTemplate.from_dict(recipe["template"])
    return DvdVLM(tower, projector, lm, tokenizer, template=template)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return load_file(str(path))
