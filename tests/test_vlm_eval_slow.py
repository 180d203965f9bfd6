"""The caption attack works: on a tiny VLM trained briefly on ShapesWorld captions, CIDEr at 4/255 falls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dvd.data.captions import CocoCaptions
from dvd.data.instruct import LlavaInstruct
from dvd.data.shapesworld import generate
from dvd.data.transforms import image_transform
from dvd.eval.captioning import evaluate_captioning
from dvd.models.vlm import build_tokenizer, create_vlm
from dvd.models.vlm_tokenizer import texts_from_files
from tiny_models import IMAGE_SIZE, TINY_LLAMA, tiny_tower

PROMPT = "Describe the image briefly."  # one of the stage-1 prompts the model is trained with


def train_captioner(world: Path, steps: int = 800):
    """Stage-1 caption data, every parameter trained from scratch (one-cycle AdamW, batch 32)."""
    files = [world / "captions" / "annotations.json", world / "llava" / "stage1_captions.json"]
    torch.manual_seed(0)
    model = create_vlm(
        tiny_tower(),
        TINY_LLAMA,
        tokenizer=build_tokenizer(texts_from_files(files)),
        template="vicuna_v1_short",
    )
    data = LlavaInstruct(
        world / "llava" / "stage1_captions.json", world / "images", transform=image_transform(32)
    )
    samples = [data[i] for i in range(len(data))]
    collate = model.collator()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        images, batch = collate([samples[i] for i in torch.randint(len(samples), (32,), generator=generator)])
        loss = model(images, batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@pytest.mark.slow
def test_caption_attack_at_4_over_255_drives_cider_far_below_clean(tmp_path: Path) -> None:
    world = tmp_path / "world"
    generate(world, size=100, eval_size=40, instruct_size=600, image_size=IMAGE_SIZE)
    model = train_captioner(world)
    captions = world / "captions"
    data = CocoCaptions(
        captions / "annotations.json",
        world / "images",
        transform=image_transform(IMAGE_SIZE),
        karpathy_json=captions / "karpathy_split.json",
        split="test",
    )
    (row,) = evaluate_captioning(
        model, data, eps_list=[4 / 255], steps=20, prompt=PROMPT, batch_size=16, progress=False
    )
    assert row.n == 32
    assert row.clean > 0.3  # the model learned to caption (measured: 0.64)
    assert row.adversarial < 0.5 * row.clean  # measured: 0.20 with 20 APGD steps
    # a targeted attack's success flag is exact: greedy decoding writes the answer, stop token included
    from dvd.eval.vlm_attack import answer_objective

    images = torch.stack([data[i]["image"] for i in range(8)])
    written = model.generate(images, [PROMPT] * 8, max_new_tokens=40)
    own = answer_objective(model, [PROMPT] * 8, written, targeted=True)(images).success
    assert own.all()
    others = written[1:] + written[:1]
    shifted = answer_objective(model, [PROMPT] * 8, others, targeted=True)(images).success
    truncated = [" ".join(w.split()[:-1]) for w in written]  # the model would go on writing
    cut = answer_objective(model, [PROMPT] * 8, truncated, targeted=True)(images).success
    same = torch.tensor([a == b for a, b in zip(written, others, strict=True)])
    assert not cut.any() and torch.equal(shifted, same)
