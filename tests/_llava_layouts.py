"""Tiny stand-ins of released LLaVA checkpoints, written in their exact on-disk layouts, and the
``llava-hf`` conversion of the same weights (the oracle: transformers' own LLaVA conversion key map)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
)

from dvd.models.vlm import MLPProjector, build_tokenizer

IMAGE_SIZE = 32
CORPUS = [
    "There is a red circle and a blue square.",
    "What color is the circle? Red.",
    "Is there a green triangle? No, there is not.",
    "Provide a short caption for this image.",
    "Answer with the option's letter from the given choices directly.",
    "A B C D E yes no",
]
LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
MEAN = open_clip.OPENAI_DATASET_MEAN
STD = open_clip.OPENAI_DATASET_STD
# transformers' convert_llava_weights_to_hf.py: original LLaVA keys -> llava-hf keys, applied in order
HF_CONVERSION = {
    "model.vision_tower.": "",
    "model.mm_projector": "multi_modal_projector",
    "model": "model.model",
    "vision_model.model": "vision_model",
    "lm_head": "language_model.lm_head",
    "model.model": "language_model.model",
    "multi_modal_projector.0": "multi_modal_projector.linear_1",
    "multi_modal_projector.2": "multi_modal_projector.linear_2",
}


def tokenizer():
    return build_tokenizer(CORPUS)


def clip_tower_dir(root: Path, seed: int = 0) -> Path:
    """A tiny ``openai/clip-vit-*``-style directory: CLIP vision weights + CLIPImageProcessor."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    directory = root / "clip-vit-tiny"
    CLIPVisionModel(config).save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(MEAN),
        image_std=list(STD),
    ).save_pretrained(directory)
    return directory


def llama(tok, seed: int = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **LLAMA,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so outputs depend on them
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def projector_weights(width: int = 32, seed: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    projector = MLPProjector(width, LLAMA["hidden_size"])
    return {f"model.mm_projector.{k}": v.detach().clone() for k, v in projector.state_dict().items()}


def llava_config(lm: LlamaForCausalLM, tower: str, width: int = 32, **extra) -> dict:
    """``config.json`` of a ``LlavaLlamaForCausalLM`` (LLaVA-1.5's fields)."""
    fields = lm.config.to_dict()
    for key in ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype"):
        fields.pop(key, None)
    return {
        "_name_or_path": "./checkpoints/llava-v1.5-tiny",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **fields,
        "mm_vision_tower": tower,
        "mm_hidden_size": width,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad",
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "use_mm_proj": True,
        **extra,
    }


def write_sharded(
    directory: Path, state: dict[str, torch.Tensor], *, safetensors: bool, shards: int = 2
) -> None:
    """HF's sharded layout: ``model-0000i-of-0000n.safetensors`` or ``pytorch_model-...bin`` + index."""
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = keys[i::shards]
        ext = "safetensors" if safetensors else "bin"
        stem = "model" if safetensors else "pytorch_model"
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        tensors = {k: state[k].contiguous() for k in part}
        if safetensors:
            save_file(tensors, str(directory / name), metadata={"format": "pt"})
        else:
            torch.save(tensors, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_full(
    directory: Path,
    lm,
    tok,
    tower: str,
    *,
    safetensors: bool,
    tower_state: dict | None = None,
    width: int = 32,
) -> dict[str, torch.Tensor]:
    """A full LLaVA-1.5 checkpoint; returns its state dict (original key names)."""
    directory.mkdir(parents=True)
    state = {**{k: v.detach().clone() for k, v in lm.state_dict().items()}, **projector_weights(width)}
    for key, value in (tower_state or {}).items():
        state[f"model.vision_tower.vision_tower.{key}"] = value
    write_sharded(directory, state, safetensors=safetensors)
    (directory / "config.json").write_text(json.dumps(llava_config(lm, tower, width)))
    tok.save_pretrained(directory)
    return state


def to_llava_hf(
    directory: Path, state: dict[str, torch.Tensor], lm_config: LlamaConfig, clip_dir: Path, tok
) -> Path:
    """The same model as ``llava-hf`` would publish it: keys mapped by transformers' conversion table,
    the tower's weights taken from the CLIP directory (as the conversion script does)."""
    tower = CLIPVisionModel.from_pretrained(clip_dir)
    converted = {}
    for key, value in tower.state_dict().items():  # the tower by name, unless the checkpoint has its own
        converted[f"vision_tower.{key}"] = value
    for key, value in state.items():
        for old, new in HF_CONVERSION.items():
            if old in key:
                key = key.replace(old, new)
        converted[key] = value
    config = LlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config=lm_config.to_dict(),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in converted.items()}, str(directory / "model.safetensors"))
    tok.save_pretrained(directory)
    CLIPImageProcessor.from_pretrained(clip_dir).save_pretrained(directory)
    return directory
