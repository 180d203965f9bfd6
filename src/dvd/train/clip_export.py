"""CLIP training weights in open_clip's layout: checkpoints and the final model are open_clip hub
folders (``open_clip.create_model("local-dir:DIR")`` loads any of them).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dvd.config import ConfigError
from dvd.io import versions, write_json
from dvd.models.clip import CONFIG_NAME, DVD_NAME, WEIGHTS_NAME, DvdCLIP
from dvd.train.checkpoint import non_finite_tensors
from dvd.train.schedule import TrainingDiverged


def export_key(key: str) -> str | None:
    """A wrapper state-dict key -> open_clip's key (None for keys that are not the CLIP's)."""
    if not key.startswith("clip.model."):
        return None
    key = key[len("clip.model.") :]
    return key.replace("parametrizations.positional_embedding.original", "positional_embedding")


class OpenClipWeights:
    """Writes and reads checkpoint weights as an open_clip hub folder (loads with ``local-dir:DIR``)."""

    def __init__(self, clip: DvdCLIP, wrapper_keys: Iterable[str], metadata: dict[str, Any]) -> None:
        self.model_cfg = clip.model_cfg
        self.preprocess_cfg = {k: v for k, v in clip.preprocess_cfg.items() if k != "size"}
        self.model_name = clip.model_name
        self.tokenizer = clip.tokenizer
        self.metadata = metadata
        self.to_wrapper = {}
        for key in wrapper_keys:
            exported = export_key(key)
            if exported is not None:
                self.to_wrapper[exported] = key

    def save(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        exported = {}
        for key, value in state.items():
            name = export_key(key)
            if name is not None:
                exported[name] = value.detach().to("cpu").contiguous()
        save_file(exported, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(
            directory / CONFIG_NAME, {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg}
        )
        if hasattr(self.tokenizer, "save_pretrained"):  # HF tokenizers travel with the weights
            self.tokenizer.save_pretrained(str(directory))
        write_json(
            directory / DVD_NAME,
            {
                "model_name": self.model_name,
                "format": "open_clip",
                "metadata": self.metadata,
                "versions": versions(),
            },
        )

    def load(self, directory: Path) -> dict[str, torch.Tensor]:
        path = directory / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint has no weights; it is incomplete")
        loaded = load_file(str(path))
        missing = sorted(set(self.to_wrapper) - set(loaded))
        if missing:
            raise ConfigError(
                f"checkpoint {directory} does not match the model: it lacks {missing[0]}; "
                "use the model it was trained with or a fresh output_dir"
            )
        return {self.to_wrapper[k]: v for k, v in loaded.items() if k in self.to_wrapper}


def export_final(weights: OpenClipWeights, state: dict[str, torch.Tensor], directory: Path) -> Path:
    """The final model as an open_clip folder, written to a temp folder and renamed into place."""
    bad = non_finite_tensors(state)
    if bad:
        raise TrainingDiverged(f"refusing to export non-finite weights ({bad[0]})")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    try:
        weights.save(state, tmp)
        old = directory.with_name(f".old-{directory.name}")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
