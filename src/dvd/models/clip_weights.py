"""Vision-tower-only checkpoints (RobustVLM's TeCoA/FARE ``.pt`` files) applied to a named CLIP.

RobustVLM releases the fine-tuned image encoder alone: a plain state dict of ``model.visual`` or,
for TeCoA, ``{"vision_encoder_state_dict": ...}``; it is loaded on top of ``ViT-L-14`` with
``pretrained=openai`` (the text tower stays OpenAI's). Pickles are read with
``torch.load(weights_only=True)`` only, so a file holding anything but tensors is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from dvd.config import ConfigError

WRAPPER_KEYS = ("vision_encoder_state_dict", "state_dict", "model")  # TeCoA, generic trainers
PREFIXES = ("module.", "visual.", "model.visual.")


def load_pickle(path: Path, *, refusal: str) -> object:
    """``torch.load(path, weights_only=True)``; a file that needs more than that is refused with a
    ConfigError saying ``refusal`` and how to convert it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not plain tensors"
        raise ConfigError(
            f"refusing to unpickle {path}: {refusal} ({type(error).__name__}); "
            "convert it to .safetensors with a tool you trust"
        ) from None


def read_vision_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The vision tower's tensors from ``path`` (safetensors, or a pickle of plain tensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vision weights {path} do not exist")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = load_pickle(path, refusal="it holds more than plain tensors")
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    if not tensors or not state:
        raise ConfigError(f"{path} is not a state dict of tensors (nor {{'vision_encoder_state_dict': ...}})")
    for prefix in PREFIXES:  # strip a wrapper prefix every key carries
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_vision_weights(visual: nn.Module, path: str | Path) -> None:
    """Replace the image tower's weights with those in ``path``; every key must fit."""
    state = read_vision_state(path)
    try:
        visual.load_state_dict(state, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise ConfigError(
            f"vision weights {path} do not fit this model's image tower: {detail[:300]}; "
            "RobustVLM's TeCoA/FARE files fit --model ViT-L-14 --pretrained openai"
        ) from None
