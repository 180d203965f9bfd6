"""Released open_clip checkpoints whose configs stock open_clip cannot build: the paper's ΔCLIPs.

The authors' open_clip fork adds ``text_cfg.vocab_path`` and tokenizes with BERT WordPiece when the
model name contains ``delta_clip``. Stock open_clip raises a ``TypeError`` on the extra field and would
tokenize with CLIP's BPE. Here a config is checked field by field against open_clip's own dataclasses:
fields dvd knows (``vocab_path``) are taken out and honoured, any other unknown field is one error
naming it. Hub repos are read with ``huggingface_hub`` exactly where open_clip looks
(``open_clip_config.json``, then ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``),
so ``HF_HUB_OFFLINE=1`` and a populated cache work as they do for open_clip.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.coca_model import CoCa
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.pretrained import download_pretrained_from_hf
from torch import nn

from dvd.config import ConfigError
from dvd.models.delta_tokenizer import VOCAB_NAME, DeltaTokenizer, packaged_vocab

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
DVD_TEXT_FIELDS = ("vocab_path",)  # known to the authors' fork, handled by dvd
DELTA_CLIP_MARKER = "delta_clip"  # the fork's rule: this in the model name selects the BERT tokenizer


def hub_files(repo_id: str) -> tuple[Path, Path]:
    """``(config, weights)`` of an open_clip hub repo, from the hub or huggingface_hub's cache."""
    config = Path(download_pretrained_from_hf(repo_id, filename=CONFIG_NAME))
    weights = Path(download_pretrained_from_hf(repo_id))  # safetensors first, then the .bin
    return config, weights


def read_config(path: Path) -> dict[str, Any]:
    """An open_clip hub config (``{"model_cfg": ..., "preprocess_cfg": ...}``), shape-checked."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not a readable open_clip config ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ConfigError(f"{path}: no 'model_cfg' object; not an open_clip hub config")
    return config


def _fields(cls: type) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


def _arguments(*classes: type) -> set[str]:
    return {name for cls in classes for name in inspect.signature(cls.__init__).parameters} - {"self"}


def split_model_cfg(model_cfg: dict[str, Any], *, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(cfg open_clip builds, dvd's text fields)``; an unknown field is a one-line ConfigError."""
    cfg = copy.deepcopy(model_cfg)
    allowed = {
        "": _arguments(CLIP, CoCa) | {"custom_text"},
        "vision_cfg": _fields(CLIPVisionCfg),
        "text_cfg": _fields(CLIPTextCfg) | set(DVD_TEXT_FIELDS),
    }
    extras: dict[str, Any] = {}
    for section, names in allowed.items():
        fields = cfg if not section else cfg.get(section)
        if section and not isinstance(fields, dict):
            raise ConfigError(f"{source}: model_cfg.{section} is missing or not an object")
        for name in fields:
            if name not in names:
                where = f"{section}.{name}" if section else name
                raise ConfigError(
                    f"{source}: model_cfg.{where} is not a field open_clip {open_clip.__version__} or dvd "
                    "knows; remove it or upgrade open_clip"
                )
    for name in DVD_TEXT_FIELDS:
        if name in cfg["text_cfg"]:
            extras[name] = cfg["text_cfg"].pop(name)
    return cfg, extras


def is_delta_clip(name: str, extras: dict[str, Any]) -> bool:
    """The fork's switch (``delta_clip`` in the name), or a config that names a WordPiece vocabulary."""
    return DELTA_CLIP_MARKER in name.lower() or "vocab_path" in extras


def delta_tokenizer(extras: dict[str, Any], cfg: dict[str, Any], *, directory: Path | None) -> DeltaTokenizer:
    """The ΔCLIP tokenizer; ``vocab_path`` is the file beside the checkpoint if there, else dvd's copy."""
    vocab = packaged_vocab()
    named = extras.get("vocab_path")
    if named:
        candidates = [Path(named)] + ([directory / Path(named).name] if directory else [])
        found = [c for c in candidates if c.is_file()]
        if found:
            vocab = found[0]
        else:  # the released configs name a path on the authors' machines
            log.info("vocab_path %s not found; using dvd's copy of the ΔCLIP vocabulary", named)
    context_length = int(cfg["text_cfg"].get("context_length", 77))
    return DeltaTokenizer(vocab, context_length=context_length)


def build_released(
    config: dict[str, Any],
    *,
    name: str,
    source: str,
    directory: Path | None,
    device: torch.device,
    precision: str,
) -> tuple[nn.Module, dict[str, Any], Any]:
    """``(open_clip model without weights, model_cfg to save, tokenizer)`` from a checked config."""
    cfg, extras = split_model_cfg(config["model_cfg"], source=source)
    clean = {"model_cfg": cfg, "preprocess_cfg": config.get("preprocess_cfg", {})}
    with tempfile.TemporaryDirectory() as tmp:  # open_clip builds hub-style configs from a directory
        (Path(tmp) / CONFIG_NAME).write_text(json.dumps(clean), encoding="utf-8")
        local = f"local-dir:{tmp}"
        model = open_clip.create_model(local, load_weights=False, device=device, precision=precision)
        tokenizer = (
            delta_tokenizer(extras, cfg, directory=directory)
            if is_delta_clip(name, extras)
            else open_clip.get_tokenizer(local)
        )
    saved = copy.deepcopy(cfg)
    if isinstance(tokenizer, DeltaTokenizer):  # saved beside the weights by DeltaTokenizer.save_pretrained
        saved["text_cfg"]["vocab_path"] = VOCAB_NAME
    return model, saved, tokenizer


def needs_dvd(config: dict[str, Any], name: str, *, source: str) -> bool:
    """Whether stock open_clip would build or tokenize this checkpoint wrongly (checks fields first)."""
    _, extras = split_model_cfg(config["model_cfg"], source=source)
    return bool(extras) or is_delta_clip(name, extras)
