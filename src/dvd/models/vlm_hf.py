"""Published LLaVA checkpoints (``transformers``' ``LlavaForConditionalGeneration``) behind dvd's interface.

:class:`HFLlava` evaluates and tunes checkpoints such as ``llava-hf/llava-1.5-7b-hf`` with the same
calls as :class:`dvd.models.vlm.DvdVLM` ([0, 1] images, CLIP mean/std inside, per-sample NLL,
greedy ``generate``). :func:`llava_with_open_clip_tower` builds a DvdVLM from such a checkpoint's
language model and an open_clip tower (e.g. ΔCLIP), as the paper's Δ²LLaVA does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from dvd.config import ConfigError
from dvd.models.vlm import DvdVLM, MLPProjector, VisionTower
from dvd.models.vlm_base import VisionLanguageModel, hf_load, set_hf_checkpointing
from dvd.models.vlm_conversation import IMAGE_TOKEN, ConversationTemplate, get_template
from dvd.models.vlm_tokenizer import ensure_image_token


class HFLlava(VisionLanguageModel):
    """A ``LlavaForConditionalGeneration`` (``.hf``) taking [0, 1] images; mean/std applied inside.

    The image features are the checkpoint's own (``vision_feature_layer``, ``vision_feature_select_strategy``
    from its config); the tokenizer's ``<image>`` id must be the config's ``image_token_id``.
    """

    def __init__(
        self,
        hf: LlavaForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        *,
        mean: Sequence[float] = open_clip.OPENAI_DATASET_MEAN,
        std: Sequence[float] = open_clip.OPENAI_DATASET_STD,
        template: str | ConversationTemplate = "vicuna_v1",
    ) -> None:
        super().__init__()
        self.hf = hf
        self.tokenizer = tokenizer
        self.template = get_template(template)
        image_id = ensure_image_token(tokenizer)
        if image_id != hf.config.image_token_id:
            raise ConfigError(
                f"the tokenizer's {IMAGE_TOKEN} is id {image_id} but the LLaVA config expects "
                f"{hf.config.image_token_id}; use the checkpoint's own tokenizer"
            )
        vision = hf.config.vision_config
        self._image_size = int(vision.image_size)
        patches = (vision.image_size // vision.patch_size) ** 2
        self._num_image_tokens = patches + (1 if hf.config.vision_feature_select_strategy == "full" else 0)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), False)

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def num_image_tokens(self) -> int:
        return self._num_image_tokens

    @property
    def image_token_id(self) -> int:
        return int(self.hf.config.image_token_id)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        vision_tower = llava_parts(self.hf)[0]
        pixels = ((images - self.mean) / self.std).to(next(vision_tower.parameters()).dtype)
        out = self.hf.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=self.hf.config.vision_feature_layer,
            vision_feature_select_strategy=self.hf.config.vision_feature_select_strategy,
        )
        # transformers 5 returns a model output whose pooler_output lists per-image features
        features = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.stack(list(features)) if isinstance(features, list | tuple) else features

    def causal_lm(self) -> nn.Module:
        return self.hf

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        vision_tower, projector, language_model, lm_head = llava_parts(self.hf)
        lm = list(language_model.parameters()) + (list(lm_head.parameters()) if lm_head is not None else [])
        return {
            "vision": list(vision_tower.parameters()),
            "projector": list(projector.parameters()),
            "lm": lm,
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_hf_checkpointing(self.hf, enable)


def llava_parts(
    hf: LlavaForConditionalGeneration,
) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module | None]:
    """(vision tower, projector, language model, LM head or None if the language model has its own)."""
    inner = getattr(hf, "model", None)
    if inner is not None and hasattr(inner, "language_model"):  # transformers >= 4.52
        return inner.vision_tower, inner.multi_modal_projector, inner.language_model, hf.lm_head
    return hf.vision_tower, hf.multi_modal_projector, hf.language_model, None


def load_hf_llava(
    name: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    template: str | ConversationTemplate = "vicuna_v1",
) -> HFLlava:
    """A published LLaVA (hub name such as ``llava-hf/llava-1.5-7b-hf``, or a local directory), in eval mode.

    Tokenizer and CLIP mean/std come from the checkpoint's processor files; weights are safetensors only.
    """
    tokenizer = hf_load(AutoTokenizer.from_pretrained, name, "LLaVA tokenizer")
    processor = hf_load(AutoImageProcessor.from_pretrained, name, "LLaVA image processor")
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    hf = hf_load(LlavaForConditionalGeneration.from_pretrained, name, "LLaVA model", **kwargs)
    model = HFLlava(hf, tokenizer, mean=processor.image_mean, std=processor.image_std, template=template)
    return model.to(device).eval()


def save_hf_llava(model: HFLlava, directory: Path) -> dict[str, Any]:
    """Write the adapter's weights and config into ``directory``; return its recipe (for :func:`save_vlm`)."""
    model.hf.save_pretrained(directory / "llava", safe_serialization=True)
    return {
        "kind": "hf-llava",
        "llava": {"dir": "llava"},
        "mean": model.mean.flatten().tolist(),
        "std": model.std.flatten().tolist(),
        "template": model.template.to_dict(),
    }


def load_saved_hf_llava(
    directory: Path, recipe: dict[str, Any], tokenizer: PreTrainedTokenizerBase, *, dtype: torch.dtype | None
) -> HFLlava:
    """The adapter written by :func:`save_hf_llava` (used by :func:`dvd.models.vlm_io.load_vlm`)."""
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    hf = LlavaForConditionalGeneration.from_pretrained(directory / recipe["llava"]["dir"], **kwargs)
    template = ConversationTemplate.from_dict(recipe["template"])
    return HFLlava(hf, tokenizer, mean=recipe["mean"], std=recipe["std"], template=template)


def llava_with_open_clip_tower(llava: HFLlava, tower: VisionTower, *, keep_projector: bool = False) -> DvdVLM:
    """A :class:`DvdVLM` with ``tower`` (e.g. ΔCLIP's) in place of the checkpoint's CLIP tower.

    The LLaVA's language model and head are *shared* (not copied) into a standalone causal LM; the
    HF vision tower is dropped. The projector is new (train it: stage 1) unless ``keep_projector``
    and the tower's width matches the checkpoint's projector input, in which case its weights are kept.
    Tokenizer and template carry over.
    """
    _, projector, language_model, lm_head = llava_parts(llava.hf)
    if lm_head is None:  # older transformers: the language model is already a causal LM
        lm = language_model
    else:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(llava.hf.config.text_config)
        prefix = lm.base_model_prefix
        if type(getattr(lm, prefix)) is not type(language_model):
            raise ConfigError(
                f"cannot place the LLaVA's {type(language_model).__name__} into {type(lm).__name__}"
            )
        setattr(lm, prefix, language_model)
        lm.set_output_embeddings(lm_head)
        leftover = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
        if leftover:
            raise ConfigError(
                f"{type(lm).__name__} has weights outside the LLaVA's language model: {leftover[:3]}"
            )
    hidden = lm.get_input_embeddings().embedding_dim
    new_projector = MLPProjector(tower.width, hidden).to(next(lm.parameters()).dtype)
    if keep_projector:
        if projector.linear_1.in_features != tower.width:
            raise ConfigError(
                f"keep_projector needs a tower of width {projector.linear_1.in_features}, got {tower.width}"
            )
        new_projector[0].load_state_dict(projector.linear_1.state_dict())
        new_projector[2].load_state_dict(projector.linear_2.state_dict())
    return DvdVLM(tower, new_projector, lm, llava.tokenizer, template=llava.template)
