"""Tiny random models and inputs shared by the tests: an open_clip ViT tower, Llama / GPT-2 language
models, a word-level tokenizer, and the VLMs built from them (dvd's and the HF LLaVA adapter).

What such models can check is the plumbing (which tokens carry loss, where gradients go, padding,
decoding, checkpoints), which does not depend on trained weights. A helper module, not a test module.
"""

from __future__ import annotations

import open_clip
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from dvd.models.vlm import VisionLanguageModel, VisionTower, build_tokenizer, create_vlm, make_conversation
from dvd.models.vlm_hf import HFLlava

IMAGE_SIZE = 32
CORPUS = [
    "There is a red circle and a blue square.",
    "What color is the circle? Red.",
    "How many squares are there? 2",
    "Is there a green triangle? No, there is not.",
    "Describe the image briefly.",
    "A small yellow star is on the left of a big circle.",
]
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}
TINY_GPT2 = {
    "model_type": "gpt2",
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 256,
    "initializer_range": 0.3,  # GPT-2's 0.02 makes a random tiny model repeat one token
    "tie_word_embeddings": False,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
}
PROMPTS = [
    "What color is the circle?",
    "How many squares are there? Describe the image briefly.",
    "Is there a star?",
]
ANSWERS = ["red", "2", "no, there is not."]


def tiny_tokenizer():
    return build_tokenizer(CORPUS)


def tiny_tower(cfg: dict = TINY_VIT) -> VisionTower:
    visual = open_clip.model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
    return VisionTower(
        visual, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD, open_clip_cfg=cfg
    )


def tiny_dvd_vlm(seed: int = 0):
    torch.manual_seed(seed)
    return create_vlm(tiny_tower(), TINY_LLAMA, tokenizer=tiny_tokenizer(), template="vicuna_v1_short").eval()


def tiny_hf_llava(seed: int = 0, tokenizer=None) -> HFLlava:
    """The HF LLaVA adapter over a tiny random LLaVA (``tokenizer`` default: the tiny one)."""
    torch.manual_seed(seed)
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    fields = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **fields,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>")
    )
    return HFLlava(LlavaForConditionalGeneration(config), tokenizer, template="vicuna_v1_short").eval()


def tiny_dvd_vlm_gpt2(seed: int = 0):
    """GPT-2 has absolute position embeddings: left padding is only right if positions skip the pads."""
    torch.manual_seed(seed)
    return create_vlm(tiny_tower(), TINY_GPT2, tokenizer=tiny_tokenizer(), template="vicuna_v1_short").eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def qa_batch(model: VisionLanguageModel, answers=ANSWERS):
    return model.collate([make_conversation(p, a) for p, a in zip(PROMPTS, answers, strict=True)])
