"""The model of a ``dvd train vlm`` job: built from a stage-1 folder, a published LLaVA or fresh parts;
what trains (stage 1: the projector; stage 2: projector + LM, full or LoRA, and optionally the tower);
optimizer groups with a learning rate per part; the units FSDP shards.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from open_clip.transformer import ResidualAttentionBlock
from peft import LoraConfig, get_peft_model
from torch import nn

from dvd.config import ConfigError
from dvd.models.vlm import DvdVLM, VisionLanguageModel, create_vlm
from dvd.models.vlm_conversation import get_template
from dvd.models.vlm_hf import HFLlava, llava_parts, load_hf_llava
from dvd.models.vlm_io import RECIPE_NAME, load_vlm
from dvd.train.rng import seed_everything
from dvd.train.scratch import random_init_expected
from dvd.train.vlm_config import DTYPES, VlmTrainConfig
from dvd.train.vlm_data import DataSource, shapesworld_tokenizer

HF_LLAVA = "hf-llava:"
PARTS = ("lm", "projector", "vision")  # the first group's lr is the one logged as train/lr


def init_folder(init: str) -> Path:
    """A save_vlm folder, or a training output_dir whose ``final`` is one."""
    path = Path(init)
    for candidate in (path, path / "final"):
        if (candidate / RECIPE_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"init={init}: neither a saved VLM ({RECIPE_NAME}) nor a training output_dir with final/; "
        "run stage 1 first or give hf-llava:NAME"
    )


def load_tokenizer(cfg: VlmTrainConfig, source: DataSource) -> Any:
    """``shapesworld[:ROOT]`` builds the small world's tokenizer; a name/path loads one; None: the LM's."""
    spec = cfg.tokenizer
    if spec is None:
        if not isinstance(cfg.lm, str):
            raise ConfigError("tokenizer=null uses the LM's own tokenizer, so lm must be a name or path")
        return None
    if spec == "shapesworld" or spec.startswith("shapesworld:"):
        root = spec.split(":", 1)[1] if ":" in spec else source.shapesworld_root
        if root is None:
            raise ConfigError(
                "tokenizer=shapesworld builds its vocabulary from a ShapesWorld root; "
                "set data=ROOT or tokenizer=shapesworld:ROOT"
            )
        return shapesworld_tokenizer(root)
    return spec


def build_vlm(
    cfg: VlmTrainConfig, source: DataSource, device: torch.device | str = "cpu"
) -> VisionLanguageModel:
    """The starting model (same weights on every call with the same seed), with what trains set up."""
    dtype = DTYPES[cfg.lm_dtype] if cfg.lm_dtype else None
    seed_everything(cfg.seed)  # identical fresh weights on every rank and on resume
    if cfg.init is not None and cfg.init.startswith(HF_LLAVA):
        vlm: VisionLanguageModel = load_hf_llava(cfg.init[len(HF_LLAVA) :], dtype=dtype)
    elif cfg.init is not None:
        vlm = load_vlm(init_folder(cfg.init), dtype=dtype)
    else:
        quiet = random_init_expected() if cfg.vision_pretrained is None else contextlib.nullcontext()
        with quiet:
            vlm = create_vlm(
                cfg.vision, cfg.lm, tokenizer=load_tokenizer(cfg, source),
                template=cfg.template or "vicuna_v1", vision_pretrained=cfg.vision_pretrained,
                feature_layer=cfg.feature_layer, lm_dtype=dtype,
            )
    if cfg.template is not None:
        vlm.template = get_template(cfg.template)
    if cfg.grad_checkpointing:
        vlm.set_grad_checkpointing(True)
    if cfg.lora:
        add_lora(vlm, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)
    set_trainable(vlm, projector=True, lm=bool(cfg.train_lm), vision=cfg.train_vision, lora=cfg.lora)
    if dtype is not None:  # lm_dtype is for frozen weights: what trains keeps fp32 master weights
        for p in vlm.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return vlm.to(device).train()


def fsdp_units(vlm: VisionLanguageModel) -> list[nn.Module]:
    """FSDP units, inner first: transformer blocks (the LMs' ``_no_split_modules``, open_clip's residual
    blocks), the token embedding, then the tower, projector and LM themselves.

    The root (:class:`InstructionStep`) keeps no parameter of its own: the attack runs inside its
    forward, and FSDP reshards everything after each of the attack's backward passes, so every
    parameter must belong to a unit that gathers itself when called.
    """
    names: set[str] = set()
    for module in vlm.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    units = [m for m in vlm.modules() if type(m).__name__ in names or isinstance(m, ResidualAttentionBlock)]
    units.append(vlm.causal_lm().get_input_embeddings())
    if isinstance(vlm, DvdVLM):
        units += [vlm.vision_tower, vlm.projector, vlm.lm]
    elif isinstance(vlm, HFLlava):
        units += [*llava_parts(vlm.hf)[:2], vlm.hf]
    else:
        raise ConfigError(f"distributed=fsdp does not know the parts of a {type(vlm).__name__}; use ddp")
    return units


# ---------------------------------------------------------------------------------------------
# what trains


def lm_slot(vlm: VisionLanguageModel) -> tuple[nn.Module, str]:
    """(parent, attribute) holding the language model, where LoRA wraps it and merges it back."""
    if isinstance(vlm, DvdVLM):
        return vlm, "lm"
    if isinstance(vlm, HFLlava):
        inner = getattr(vlm.hf, "model", None)
        if inner is not None and hasattr(inner, "language_model"):
            return inner, "language_model"
        return vlm.hf, "language_model"
    raise ConfigError(f"cannot find the language model of a {type(vlm).__name__}")


def add_lora(vlm: VisionLanguageModel, *, r: int, alpha: int, dropout: float, targets: list[str]) -> None:
    """Wrap the language model in ``peft`` LoRA adapters (only the adapters train)."""
    parent, name = lm_slot(vlm)
    lm = getattr(parent, name)
    is_causal = hasattr(lm, "get_output_embeddings") and lm.get_output_embeddings() is not None
    target: str | list[str] = "all-linear" if targets == ["all-linear"] else list(targets)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, bias="none",
        task_type="CAUSAL_LM" if is_causal else None,
    )
    setattr(parent, name, get_peft_model(lm, config))


def merge_lora(vlm: VisionLanguageModel) -> None:
    """Fold LoRA adapters into the language model's weights (for saving a plain model)."""
    parent, name = lm_slot(vlm)
    lm = getattr(parent, name)
    if hasattr(lm, "merge_and_unload"):
        setattr(parent, name, lm.merge_and_unload())


def set_trainable(vlm: VisionLanguageModel, *, projector: bool, lm: bool, vision: bool, lora: bool) -> None:
    """Freeze everything (``requires_grad_(False)``, never ``no_grad``), then unfreeze the chosen parts.

    With ``lora`` the language model's adapters train and its own weights stay frozen.
    """
    vlm.requires_grad_(False)
    groups = vlm.param_groups()
    for part, on in (("projector", projector), ("vision", vision), ("lm", lm and not lora)):
        if on:
            for p in groups[part]:
                p.requires_grad_(True)
    if lm and lora:
        for name, p in vlm.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)


def decays(name: str, p: nn.Parameter) -> bool:
    """Whether weight decay applies to parameter ``name``: matrices, not norms or biases."""
    return p.ndim >= 2 and "norm" not in name and "bias" not in name


def optimizer_groups(
    vlm: VisionLanguageModel, *, lrs: dict[str, float], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups per part (``vision``, ``projector``, ``lm``) with their own lr; decay on matrices only."""
    part_of = {id(p): part for part, params in vlm.param_groups().items() for p in params}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in vlm.named_parameters():
        if not p.requires_grad:
            continue
        part = part_of.get(id(p), "lm")  # LoRA adapters live in the language model
        groups.setdefault((part, decays(name, p)), []).append(p)
    out = []
    for part in PARTS:
        for decay in (True, False):
            params = groups.get((part, decay))
            if params:
                out.append({"params": params, "lr": lrs[part], "weight_decay": weight_decay if decay else 0.0,
                            "name": f"{part}{'' if decay else '_no_decay'}"})
    if not out:
        raise ConfigError("nothing to train: every parameter is frozen")
    return out
