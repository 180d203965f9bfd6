"""LLaVA-style VLM: open_clip ViT (penultimate-layer patch tokens) -> ``mlp2x_gelu`` -> any HF causal LM.

Front door: :func:`create_vlm`; saving and loading (also of the HF LLaVA adapter,
:class:`dvd.models.vlm_hf.HFLlava`) are :mod:`dvd.models.vlm_io`'s. Both implement
:class:`VisionLanguageModel`: ``per_sample_nll(images, batch)``, ``forward(images, batch) -> VLMOutput``,
``generate(images, prompts)``, ``collator()``, with images in [0, 1] and the tower's mean/std applied inside.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import open_clip
import torch
from open_clip.transformer import VisionTransformer
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dvd.config import ConfigError
from dvd.models.clip import create_clip
from dvd.models.vlm_base import VisionLanguageModel, VLMOutput, hf_load, set_hf_checkpointing
from dvd.models.vlm_conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    TEMPLATES,
    ConversationTemplate,
    VLMBatch,
    VLMCollator,
    get_template,
    make_conversation,
)
from dvd.models.vlm_tokenizer import build_tokenizer, ensure_image_token

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "TEMPLATES",
    "ConversationTemplate",
    "DvdVLM",
    "MLPProjector",
    "VLMBatch",
    "VLMCollator",
    "VLMOutput",
    "VisionLanguageModel",
    "VisionTower",
    "build_tokenizer",
    "create_vlm",
    "make_conversation",
    "vision_tower_from_clip",
]



class VisionTower(nn.Module):
    """Patch tokens (class token dropped) of one block of an open_clip ViT, from [0, 1] images.

    ``feature_layer=-2`` is LLaVA-1.5's penultimate block. The tower takes ownership of ``visual``:
    blocks after the feature layer, the final norm and the projection are dropped (they never reach
    the output, and unused trainable parameters would trip DDP), and patch dropout is disabled (the
    LM needs a fixed number of image tokens). ``open_clip_cfg`` (open_clip's model config dict) lets
    :func:`load_vlm` rebuild the trunk.
    """

    def __init__(
        self,
        visual: nn.Module,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        feature_layer: int = -2,
        open_clip_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise ConfigError(
                f"the vision tower must be an open_clip VisionTransformer (ViT), got {type(visual).__name__}"
            )
        if not hasattr(visual, "forward_intermediates"):
            raise ConfigError("this open_clip has no forward_intermediates; upgrade open_clip_torch")
        depth = len(visual.transformer.resblocks)
        index = feature_layer + depth if feature_layer < 0 else feature_layer
        if not 0 <= index < depth:
            raise ConfigError(f"feature_layer {feature_layer} is outside the tower's {depth} blocks")
        height, width = visual.image_size
        if height != width:
            raise ConfigError(
                f"the vision tower takes {height}x{width} images; only square towers are supported"
            )
        visual.patch_dropout = nn.Identity()
        visual.prune_intermediate_layers([index], prune_norm=True, prune_head=True)
        self.visual = visual
        self.feature_layer = feature_layer
        self.feature_index = index
        self.open_clip_cfg = copy.deepcopy(dict(open_clip_cfg)) if open_clip_cfg is not None else None
        self.image_size = int(height)
        self.width = int(visual.transformer.width)
        self.num_patches = int(visual.grid_size[0] * visual.grid_size[1])
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, num_patches, width)."""
        dtype = self.visual.conv1.weight.dtype
        pixels = ((images - self.mean) / self.std).to(dtype)
        out = self.visual.forward_intermediates(
            pixels, indices=[self.feature_index], stop_early=True, intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][0]

    def recipe(self) -> dict[str, Any]:
        if self.open_clip_cfg is None:
            raise ConfigError(
                "this vision tower was built without its open_clip config; "
                "pass open_clip_cfg= so that it can be saved"
            )
        return {
            "open_clip_cfg": self.open_clip_cfg,
            "feature_layer": self.feature_layer,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "image_size": self.image_size,
        }

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any]) -> VisionTower:
        """A randomly initialised tower of the recorded architecture (load weights after)."""
        cfg = recipe["open_clip_cfg"]
        # open_clip builds towers from a config only inside CLIP(); this is the same builder
        visual = open_clip.model._build_vision_tower(
            cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False)
        )
        return cls(
            visual,
            mean=recipe["mean"],
            std=recipe["std"],
            feature_layer=recipe["feature_layer"],
            open_clip_cfg=cfg,
        )


def vision_tower_from_clip(
    clip: nn.Module, *, feature_layer: int = -2, open_clip_cfg: Mapping[str, Any] | None = None
) -> VisionTower:
    """The vision tower of a :class:`dvd.models.clip.DvdCLIP` or a plain open_clip CLIP.

    The CLIP's ``visual`` moves into the tower (and is pruned); pass ``copy.deepcopy(clip)`` to keep
    using the CLIP. Mean/std come from the model's preprocessing config (OpenAI's if it has none).
    """
    if hasattr(clip, "model") and hasattr(clip, "preprocess_cfg"):  # DvdCLIP
        cfg = open_clip_cfg if open_clip_cfg is not None else getattr(clip, "model_cfg", None)
        preprocess, visual = clip.preprocess_cfg, clip.model.visual
    elif hasattr(clip, "visual"):
        cfg, visual = open_clip_cfg, clip.visual
        preprocess = open_clip.get_model_preprocess_cfg(clip)
    else:
        raise ConfigError(f"expected a DvdCLIP or an open_clip CLIP, got {type(clip).__name__}")
    mean = preprocess.get("mean") or open_clip.OPENAI_DATASET_MEAN
    std = preprocess.get("std") or open_clip.OPENAI_DATASET_STD
    return VisionTower(visual, mean=mean, std=std, feature_layer=feature_layer, open_clip_cfg=cfg)


class MLPProjector(nn.Sequential):
    """LLaVA-1.5's ``mlp2x_gelu``: Linear(vision width, LM hidden) -> GELU -> Linear(LM hidden, LM hidden)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(
            nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features)
        )
        self.in_features, self.out_features = in_features, out_features


class DvdVLM(VisionLanguageModel):
    """Our LLaVA: ``vision_tower`` -> ``projector`` -> ``lm`` (an HF causal LM fed ``inputs_embeds``).

    Freeze parts with ``requires_grad_(False)`` (see :meth:`param_groups`); no forward runs under
    ``no_grad`` except :meth:`generate`, so attacks get pixel gradients from :meth:`per_sample_nll`.
    """

    def __init__(
        self,
        vision_tower: VisionTower,
        projector: nn.Module,
        lm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        template: str | ConversationTemplate = "vicuna_v1",
    ) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.lm = lm
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self._image_token_id = ensure_image_token(tokenizer)
        embeddings = lm.get_input_embeddings()
        hidden, rows = embeddings.embedding_dim, embeddings.num_embeddings
        if (projector.in_features, projector.out_features) != (vision_tower.width, hidden):
            raise ConfigError(
                f"projector maps {projector.in_features}->{projector.out_features} but the tower gives "
                f"{vision_tower.width} and the LM takes {hidden}"
            )
        largest = max(i for i in tokenizer.get_vocab().values() if i != self._image_token_id)
        if largest >= rows:
            raise ConfigError(
                f"the tokenizer has ids up to {largest} but the LM embeds only {rows}; "
                "call lm.resize_token_embeddings(len(tokenizer))"
            )

    @property
    def image_size(self) -> int:
        return self.vision_tower.image_size

    @property
    def num_image_tokens(self) -> int:
        return self.vision_tower.num_patches

    @property
    def image_token_id(self) -> int:
        return self._image_token_id

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.projector(self.vision_tower(images))

    def causal_lm(self) -> nn.Module:
        return self.lm

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "vision": list(self.vision_tower.parameters()),
            "projector": list(self.projector.parameters()),
            "lm": list(self.lm.parameters()),
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the tower and the LM (non-reentrant, so attacks' backward works)."""
        self.vision_tower.visual.set_grad_checkpointing(enable)
        set_hf_checkpointing(self.lm, enable)


def create_vlm(
    vision: str | nn.Module,
    lm: str | Mapping[str, Any] | PretrainedConfig | PreTrainedModel,
    *,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    template: str | ConversationTemplate = "vicuna_v1",
    vision_pretrained: str | None = None,
    feature_layer: int = -2,
    lm_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> DvdVLM:
    """Build a :class:`DvdVLM` with a fresh ``mlp2x_gelu`` projector.

    ``vision``: a :class:`VisionTower`, a DvdCLIP / open_clip CLIP, or a name for
    :func:`dvd.models.clip.create_clip` (open_clip name, ``hf-hub:`` tag, config JSON; weights from
    ``vision_pretrained``). ``lm``: an HF name or path (``AutoModelForCausalLM.from_pretrained``,
    safetensors only, no remote code), a config or dict with ``model_type`` (random init; vocab size
    defaults to the tokenizer's), or a model. ``tokenizer``: the LM's own by default (``<image>`` is added).
    """
    tower = _vision_tower(vision, vision_pretrained, feature_layer)
    if tokenizer is None:
        if not isinstance(lm, str):
            raise ConfigError(
                "give tokenizer= (e.g. build_tokenizer(texts)) when the LM is not a name or path"
            )
        tokenizer = lm
    if isinstance(tokenizer, str):
        tokenizer = hf_load(AutoTokenizer.from_pretrained, tokenizer, "tokenizer")
    ensure_image_token(tokenizer)
    language_model = build_language_model(lm, tokenizer, lm_dtype)
    hidden = language_model.get_input_embeddings().embedding_dim
    projector = MLPProjector(tower.width, hidden)
    if lm_dtype is not None:
        projector.to(lm_dtype)
    return DvdVLM(tower, projector, language_model, tokenizer, template=template).to(device)


def _vision_tower(vision: str | nn.Module, pretrained: str | None, feature_layer: int) -> VisionTower:
    if isinstance(vision, VisionTower):
        return vision
    if isinstance(vision, str):
        vision = create_clip(vision, pretrained=pretrained)
    elif pretrained is not None:
        raise ConfigError("vision_pretrained only applies when vision is a model name")
    return vision_tower_from_clip(vision, feature_layer=feature_layer)


def build_language_model(
    lm: str | Mapping[str, Any] | PretrainedConfig | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype | None,
) -> PreTrainedModel:
    """The causal LM ``lm`` names (see :func:`create_vlm`); a config's vocabulary and special ids are the
    tokenizer's."""
    if isinstance(lm, PreTrainedModel):
        return lm
    if isinstance(lm, str):
        kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False}
        if dtype is not None:
            kwargs["dtype"] = dtype
        return hf_load(AutoModelForCausalLM.from_pretrained, lm, "language model", **kwargs)
    if isinstance(lm, Mapping):
        fields = dict(lm)
        if "model_type" not in fields:
            raise ConfigError("an LM config dict needs model_type (e.g. 'llama')")
        fields.setdefault("vocab_size", len(tokenizer))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            fields.setdefault(name, getattr(tokenizer, name))
        lm = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if isinstance(lm, PretrainedConfig):
        model = AutoModelForCausalLM.from_config(lm)
        return model.to(dtype) if dtype is not None else model
    raise ConfigError(f"lm must be a name, a config or a model, got {type(lm).__name__}")
