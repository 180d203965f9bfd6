"""A tiny VLM trained on ShapesWorld on CPU (stage 1, then stage 2) answers held-out questions mostly right.

Minutes on one CPU thread: marked slow. The numbers it measured are in benchmarks/README.md
("Δ²LLaVA pipeline quality on ShapesWorld").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dvd.config import load_config
from dvd.data.captions import CocoCaptions
from dvd.data.transforms import image_transform
from dvd.data.vqa import VQAv2
from dvd.eval.captioning import cider
from dvd.eval.vqa import vqa_accuracy
from dvd.models.vlm_io import load_vlm
from dvd.train.vlm import train_vlm
from dvd.train.vlm_config import VlmTrainConfig

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
VIT = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}
LM = (
    "lm={model_type: llama, hidden_size: 128, intermediate_size: 256, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 4, max_position_embeddings: 256}"
)


def evaluate(model, root: Path) -> dict[str, float]:
    """CIDEr of greedy captions (Karpathy test split) and VQA accuracy, all on held-out images."""
    transform = image_transform(model.image_size)
    captions = CocoCaptions(
        root / "captions" / "annotations.json", root / "images", transform=transform,
        karpathy_json=root / "captions" / "karpathy_split.json", split="test",
    )
    items = [captions[i] for i in range(len(captions))]
    generated = model.generate(
        torch.stack([it["image"] for it in items]), "Describe the image.", max_new_tokens=20
    )
    score = cider({i: it["captions"] for i, it in enumerate(items)}, dict(enumerate(generated)))
    vqa = VQAv2(
        root / "vqa" / "questions.json",
        root / "vqa" / "annotations.json",
        root / "images",
        transform=transform,
    )
    items = [vqa[i] for i in range(len(vqa))]
    prompts = [it["question"] + SHORT_ANSWER for it in items]
    answers = model.generate(torch.stack([it["image"] for it in items]), prompts, max_new_tokens=5)
    accuracy = [vqa_accuracy(a, it["answers"]) for a, it in zip(answers, items, strict=True)]
    colour = [a for a, it in zip(accuracy, items, strict=True) if it["question"].startswith("What color")]
    return {
        "cider": score,
        "vqa_accuracy": sum(accuracy) / len(accuracy),
        "colour_accuracy": sum(colour) / len(colour),
        "questions": len(accuracy),
        "colour_questions": len(colour),
        "captioned_images": len(generated),
    }


@pytest.mark.slow
def test_tiny_vlm_trained_in_two_stages_answers_held_out_colour_questions_mostly_right(tmp_path):
    from dvd.data.shapesworld import generate

    root = tmp_path / "sw"
    generate(root, seed=0, size=200, image_size=32, eval_size=50, instruct_size=800)
    (tmp_path / "vit.json").write_text(json.dumps(VIT))
    common = [
        f"data={root}", f"vision={tmp_path / 'vit.json'}", LM, "template=vicuna_v1_short", "batch_size=16",
        "progress=false", "checkpoint_every=100000", "log_every=50", "seed=0",
    ]
    stage1 = [f"output_dir={tmp_path / 's1'}", "stage=1", "steps=100", "lr=1e-3"]
    train_vlm(load_config(VlmTrainConfig, None, common + stage1))
    stage2 = [
        f"output_dir={tmp_path / 's2'}", "stage=2", f"init={tmp_path / 's1'}", "steps=800", "lr=1e-3",
        "train_vision=true", "vision_lr=1e-3", "projector_lr=1e-3", "warmup_steps=20",
    ]
    train_vlm(load_config(VlmTrainConfig, None, common + stage2))

    scores = evaluate(load_vlm(tmp_path / "s2" / "final"), root)
    print(json.dumps(scores))
    assert scores["colour_accuracy"] >= 0.6  # chance: 1/8 object colours, 1/5 backgrounds
    assert scores["vqa_accuracy"] >= 0.45
    assert scores["cider"] >= 0.3
