"""LLaVA as its authors release it (haotian-liu/LLaVA, LLaVA-NeXT), loaded into a :class:`DvdVLM`.

Three layouts, as LLaVA's own ``load_pretrained_model`` reads them:

- **full** (``liuhaotian/llava-v1.5-7b``): ``config.json`` of a ``LlavaLlamaForCausalLM`` with the
  ``mm_*`` fields, the LM's tokenizer, weights (``.safetensors`` or ``.bin``, sharded with an index)
  holding the LM, ``model.mm_projector.{0,2}.*`` and, if the tower was trained,
  ``model.vision_tower.vision_tower.*``;
- **lora** (the paper's ``zw123/delta2_llava_4_v1_5_7b``): ``config.json``, PEFT adapter files and
  ``non_lora_trainables.bin`` (keys prefixed ``base_model.model.``), on the LM given as ``model_base``;
  the adapter is merged;
- **projector** (stage-1 output): ``config.json`` and ``mm_projector.bin`` on ``model_base``.

The tower comes from ``mm_vision_tower``: a ``transformers`` CLIP name or directory, or
``open_clip:<name>`` (also LLaVA-NeXT's ``open_clip_hub:``) for an open_clip tower such as ΔCLIP.
Features: hidden state ``mm_vision_select_layer`` (-2), class token dropped (``patch``). Pickled files
are read with ``torch.load(weights_only=True)`` only. The model carries LLaVA's preprocessing
(``image_aspect_ratio = pad``) as ``model.image_transform``.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionModel,
    PreTrainedModel,
)

from dvd.config import ConfigError
from dvd.io import read_json
from dvd.models.llava_preprocess import llava_transform
from dvd.models.vlm import DvdVLM, MLPProjector, vision_tower_from_clip
from dvd.models.vlm_base import hf_load, set_hf_checkpointing

try:  # transformers >= 5
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover - older transformers
    from transformers.modeling_utils import no_init_weights

OPEN_CLIP_PREFIXES = ("open_clip:", "open_clip_hub:")
PROJECTOR_PREFIX = "model.mm_projector."
TOWER_PREFIX = "model.vision_tower.vision_tower."
# LLaVA's text-model classes -> transformers' model_type of the LM inside
ARCHITECTURES = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaQwenForCausalLM": "qwen2",
}
MODEL_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# config keys that describe LLaVA's multimodal parts or its training run, not the LM
NON_LM_KEYS = {
    "architectures",
    "model_type",
    "_name_or_path",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "image_processor_name_or_path",
    "freeze_mm_mlp_adapter",
    "freeze_mm_vision_resampler",
    "tune_mm_mlp_adapter",
    "tune_mm_vision_resampler",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "vision_tower_pretrained",
    "transformers_version",
}


# --- finding and recognising a checkpoint -----------------------------------------------------------
def resolve_checkpoint(spec: str | Path) -> Path | None:
    """A local directory, or the cached snapshot of a hub name (never downloads); None if neither."""
    path = Path(spec)
    if path.is_dir():
        return path
    text = str(spec)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/")):
        return None
    try:
        return Path(snapshot_download(text, local_files_only=True))
    except Exception:  # not in the cache (or not a valid repo id): the caller decides what that means
        return None


def is_llava_original(spec: str | Path) -> bool:
    """Whether ``spec`` names a checkpoint in LLaVA's original layout (a config with ``mm_vision_tower``)."""
    directory = resolve_checkpoint(spec)
    if directory is None or (directory / "dvd_vlm.json").is_file():
        return False
    if not (directory / "config.json").is_file():
        return False
    try:
        config = read_json(directory / "config.json")
    except (ValueError, FileNotFoundError):
        return False
    return isinstance(config, dict) and "mm_vision_tower" in config


def checkpoint_layout(directory: Path) -> str:
    """``lora`` (PEFT adapter), ``projector`` (``mm_projector.bin`` only) or ``full``."""
    if (directory / "adapter_config.json").is_file():
        return "lora"
    has_lm = any((directory / name).is_file() for name in WEIGHT_INDEXES + WEIGHT_FILES)
    if (directory / "mm_projector.bin").is_file() and not has_lm:
        return "projector"
    return "full"


# --- reading weights ----------------------------------------------------------------------------------
def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one weights file: safetensors, or a pickle read with ``weights_only=True`` only."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{path}: refused: not a plain tensor checkpoint "
            f"(torch.load with weights_only=True failed: {first})"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: refused: expected a dict of tensors, got {type(state).__name__}")
    return dict(state)


def read_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) HF checkpoint, safetensors preferred over ``.bin``."""
    for index_name in WEIGHT_INDEXES:
        index = directory / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no weight_map")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(read_weights(directory / shard))
            return state
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return read_weights(directory / name)
    raise FileNotFoundError(
        f"{directory}: no weights (expected {' or '.join(WEIGHT_INDEXES + WEIGHT_FILES)})"
    )


def split_llava_state(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LM, projector, vision tower) weights of a ``LlavaLlamaForCausalLM`` state dict, prefixes removed
    from the projector (``0.weight``...) and the tower (its own module's keys)."""
    lm, projector, tower = {}, {}, {}
    for key, value in state.items():
        if key.startswith(PROJECTOR_PREFIX):
            projector[key[len(PROJECTOR_PREFIX) :]] = value
        elif key.startswith(TOWER_PREFIX):
            tower[key[len(TOWER_PREFIX) :]] = value
        elif key.startswith("model.vision_resampler."):
            continue  # LLaVA's identity resampler has no weights worth keeping
        else:
            lm[key] = value
    return lm, projector, tower


def non_lora_trainables(path: Path) -> dict[str, torch.Tensor]:
    """``non_lora_trainables.bin`` with LLaVA's key fix-up: drop ``base_model.``, then the PEFT wrapper's
    extra ``model.`` when keys start ``model.model.``."""
    state = {k.removeprefix("base_model."): v for k, v in read_weights(path).items()}
    if any(k.startswith("model.model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state


# --- the parts ----------------------------------------------------------------------------------------
class HFCLIPVisionTower(nn.Module):
    """A ``transformers`` CLIP vision model as a dvd tower: [0, 1] images -> hidden state
    ``feature_layer`` (LLaVA's ``mm_vision_select_layer``), class token dropped unless
    ``keep_class_token``."""

    def __init__(
        self,
        clip: CLIPVisionModel,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        feature_layer: int = -2,
        keep_class_token: bool = False,
    ) -> None:
        super().__init__()
        config = clip.config
        depth = int(config.num_hidden_layers)
        if not -(depth + 1) <= feature_layer <= depth:
            raise ConfigError(f"mm_vision_select_layer {feature_layer} is outside the tower's {depth} layers")
        self.clip = clip
        self.feature_layer = feature_layer
        self.keep_class_token = keep_class_token
        self.image_size = int(config.image_size)
        self.width = int(config.hidden_size)
        self.num_patches = (self.image_size // int(config.patch_size)) ** 2 + int(keep_class_token)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), False)

    @property
    def visual(self) -> HFCLIPVisionTower:
        """Where :class:`DvdVLM` looks for ``set_grad_checkpointing`` (open_clip's name for the trunk)."""
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_hf_checkpointing(self.clip, enable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, num_patches, width)."""
        pixels = ((images - self.mean) / self.std).to(self.clip.dtype)
        hidden = self.clip(pixel_values=pixels, output_hidden_states=True).hidden_states[self.feature_layer]
        return hidden if self.keep_class_token else hidden[:, 1:]

    def recipe(self) -> dict[str, Any]:
        raise ConfigError(
            "a LLaVA with a transformers CLIP tower is not saved as a dvd checkpoint; "
            "evaluate it from its own directory (dvd eval ... --model DIR)"
        )


def build_vision_tower(
    config: Mapping[str, Any], weights: Mapping[str, torch.Tensor], dtype: torch.dtype | None
) -> nn.Module:
    """The tower named by ``mm_vision_tower``, with ``weights`` (trained tower weights) loaded over it."""
    name = str(config["mm_vision_tower"])
    layer = int(config.get("mm_vision_select_layer", -2))
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConfigError(f"mm_vision_select_feature {select!r} is not supported (use patch or cls_patch)")
    prefix = next((p for p in OPEN_CLIP_PREFIXES if name.startswith(p)), None)
    if prefix is not None:
        from dvd.models.clip import create_clip  # deferred as in dvd.models.vlm; open_clip towers only

        if select != "patch":
            raise ConfigError("an open_clip tower gives patch tokens only (mm_vision_select_feature patch)")
        tower: nn.Module = vision_tower_from_clip(create_clip(name[len(prefix) :]), feature_layer=layer)
        if weights:
            _load_tower(tower, {f"visual.{k}": v for k, v in weights.items()}, name)
    else:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        clip = hf_load(CLIPVisionModel.from_pretrained, name, "vision tower", **kwargs)
        processor = hf_load(CLIPImageProcessor.from_pretrained, name, "vision tower image processor")
        tower = HFCLIPVisionTower(
            clip,
            mean=processor.image_mean,
            std=processor.image_std,
            feature_layer=layer,
            keep_class_token=select == "cls_patch",
        )
        if weights:
            _load_tower(tower, {f"clip.{k}": v for k, v in weights.items()}, name)
    return tower.to(dtype) if dtype is not None else tower


def _load_tower(tower: nn.Module, weights: dict[str, torch.Tensor], name: str) -> None:
    """Load a checkpoint's tower weights; keys of blocks the tower pruned are ignored, none may be missing."""
    own = tower.state_dict()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise ValueError(f"the checkpoint's weights for the tower {name} lack {missing[:3]}")
    tower.load_state_dict({k: v for k, v in weights.items() if k in own})


def build_projector(
    config: Mapping[str, Any], weights: Mapping[str, torch.Tensor], lm_hidden: int
) -> MLPProjector:
    """LLaVA-1.5's ``mlp2x_gelu`` projector from ``model.mm_projector.{0,2}.*``."""
    kind = config.get("mm_projector_type", "linear")
    if kind != "mlp2x_gelu":
        raise ConfigError(
            f"mm_projector_type {kind!r} is not supported; LLaVA-1.5 and Δ²LLaVA use mlp2x_gelu"
        )
    width = int(config.get("mm_hidden_size", 0))
    projector = MLPProjector(width, lm_hidden)
    expected = set(projector.state_dict())
    if set(weights) != expected:
        raise ValueError(
            f"projector weights {sorted(weights)} do not match mlp2x_gelu's {sorted(expected)} "
            f"(keys {PROJECTOR_PREFIX}0/2.weight/bias)"
        )
    shapes = {k: tuple(v.shape) for k, v in projector.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in weights.items()}
    if given != shapes:
        raise ValueError(f"projector weights have shapes {given}; mm_hidden_size and the LM say {shapes}")
    projector.load_state_dict(dict(weights))
    return projector


def lm_config(config: Mapping[str, Any]) -> Any:
    """The causal LM's ``transformers`` config from a LLaVA ``config.json`` (its ``mm_*`` fields dropped)."""
    architectures = config.get("architectures") or []
    model_type = next((ARCHITECTURES[a] for a in architectures if a in ARCHITECTURES), None)
    model_type = model_type or MODEL_TYPES.get(str(config.get("model_type")))
    if model_type is None:
        raise ConfigError(
            f"unknown LLaVA language model {architectures or config.get('model_type')!r}; "
            f"expected one of {', '.join(ARCHITECTURES)}"
        )
    fields = {k: v for k, v in config.items() if k not in NON_LM_KEYS and not k.startswith("mm_")}
    return AutoConfig.for_model(model_type, **fields)


def build_lm(config: Any, weights: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> PreTrainedModel:
    """The causal LM of ``config`` holding exactly ``weights`` (every parameter must be given)."""
    with no_init_weights():
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    result = lm.load_state_dict(dict(weights), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"language-model weights do not fit {type(lm).__name__}: missing {missing[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]}"
        )
    if tied:
        lm.tie_weights()
    return lm.eval()


# --- the front door -----------------------------------------------------------------------------------
def load_llava_original(
    spec: str | Path,
    *,
    model_base: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    template: str = "vicuna_v1",
) -> DvdVLM:
    """A released LLaVA (full, LoRA or projector-only layout; see the module docstring), in eval mode.

    ``model_base`` (directory or cached hub name of the base LM, e.g. ``lmsys/vicuna-7b-v1.5``) is
    required by the LoRA and projector layouts and refused by the full one. ``template`` is LLaVA-1.5's
    evaluation conversation (``vicuna_v1``).
    """
    directory = resolve_checkpoint(spec)
    if directory is None:
        raise FileNotFoundError(f"{spec}: not a directory and not in the Hugging Face cache")
    config = read_json(directory / "config.json")
    if config.get("mm_use_im_start_end"):
        raise ConfigError(f"{directory}: mm_use_im_start_end (image start/end tokens) is not supported")
    layout = checkpoint_layout(directory)
    base = None
    if layout == "full":
        if model_base is not None:
            raise ConfigError(f"{directory} holds a full LLaVA; drop --model-base")
        state = read_checkpoint(directory)
        tokenizer_dir = directory
    else:
        if model_base is None:
            raise ConfigError(
                f"{directory} is a LLaVA {layout} checkpoint; give the base LM with --model-base"
            )
        base = resolve_checkpoint(model_base)
        if base is None:
            raise FileNotFoundError(
                f"--model-base {model_base}: not a directory and not in the Hugging Face cache"
            )
        state = read_checkpoint(base)
        extra = directory / ("non_lora_trainables.bin" if layout == "lora" else "mm_projector.bin")
        state.update(non_lora_trainables(extra) if layout == "lora" else read_weights(extra))
        tokenizer_dir = base
    lm_weights, projector_weights, tower_weights = split_llava_state(state)
    lm = build_lm(lm_config(config), lm_weights, dtype)
    if layout == "lora":
        lm = _merge_lora(lm, directory)
    tokenizer = hf_load(AutoTokenizer.from_pretrained, str(tokenizer_dir), "LLaVA tokenizer")
    tower = build_vision_tower(config, tower_weights, dtype)
    projector = build_projector(config, projector_weights, lm.get_input_embeddings().embedding_dim)
    if dtype is not None:
        projector.to(dtype)
    model = DvdVLM(tower, projector, lm, tokenizer, template=template)
    aspect = str(config.get("image_aspect_ratio") or "square")
    model.image_transform = llava_transform(model.image_size, tower.mean.flatten().tolist(), aspect)
    model.llava_layout = layout
    return model.to(device).eval()


def _merge_lora(lm: PreTrainedModel, directory: Path) -> PreTrainedModel:
    """The PEFT adapter in ``directory`` merged into ``lm`` (peft reads ``.bin`` with weights_only)."""
    from peft import PeftModel  # deferred: only LoRA releases need peft

    if not any((directory / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(f"{directory}: adapter_config.json but no adapter_model.safetensors/.bin")
    return PeftModel.from_pretrained(lm, str(directory)).merge_and_unload().eval()


__all__ = [
    "HFCLIPVisionTower",
    "build_lm",
    "build_projector",
    "build_vision_tower",
    "checkpoint_layout",
    "is_llava_original",
    "load_llava_original",
    "non_lora_trainables",
    "read_checkpoint",
    "read_weights",
    "resolve_checkpoint",
    "split_llava_state",
]
