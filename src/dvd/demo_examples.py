"""The demo report's examples: a few ShapesWorld test images attacked at the headline budget, with what
each CLIP reads (zero-shot, every task) and what each VLM writes, before and after the attack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dvd.attacks import apgd, from_callable
from dvd.data.shapesworld_scenes import NUMBER_WORDS
from dvd.data.zeroshot import load_zeroshot
from dvd.demo_figures import HEADLINE_EPS, draw_caption_grid, draw_reading_grid
from dvd.demo_preset import TASK_ORDER, VLM_MODELS, ReportInputs
from dvd.eval.captioning import instruct_caption_prompt
from dvd.eval.vlm_attack import attack_answers
from dvd.eval.zeroshot import build_text_classifier
from dvd.io import read_json
from dvd.models.clip import load_clip
from dvd.models.vlm_io import load_vlm


def example_grid(
    inputs: ReportInputs, path: Path, *, count: int = 4, steps: int = 100, eps: float = HEADLINE_EPS
) -> Path:
    """Clean test images and each CLIP's worst case at ``eps``, with its zero-shot reading of all tasks."""
    world = inputs.layout.world
    models = [m for m in ("clean-clip", "delta-clip", "tecoa", "fare") if inputs.layout.final(m).is_dir()]
    if not models:
        raise FileNotFoundError("no trained CLIP in the demo folder")
    scenes = [s for s in read_json(world / "images" / "scenes.json") if s["split"] == "test"]
    picked = _pick_scenes(scenes, count)
    images = torch.stack([_load_image(world / "images" / s["file_name"]) for s in picked])
    tasks = [t for t in TASK_ORDER if (world / "zeroshot" / t / "classnames.txt").is_file()]
    truth = [[_truth(s, t) for t in tasks] for s in picked]
    readings: dict[str, tuple[torch.Tensor, list[list[str]], list[list[str]]]] = {}
    for name in models:
        clip = load_clip(inputs.layout.final(name)).eval()
        heads = []
        for task in tasks:
            data = load_zeroshot(world / "zeroshot" / task, transform=None)
            weights = build_text_classifier(clip, data.classnames, data.templates)
            heads.append((data.classnames, weights))
        scale = float(clip.logit_scale.detach())

        def logits(x: torch.Tensor, clip: Any = clip, heads: list = heads, scale: float = scale) -> list:
            features = clip.encode_image(x)
            return [scale * features @ w for _, w in heads]

        def read(x: torch.Tensor, heads: list = heads, logits: Any = logits) -> list[list[str]]:
            with torch.no_grad():
                outs = logits(x)
            return [[heads[t][0][int(o[i].argmax())] for t, o in enumerate(outs)] for i in range(len(x))]

        clean = read(images)
        labels = [
            torch.tensor([heads[t][0].index(truth[i][t]) for i in range(len(picked))])
            for t in range(len(tasks))
        ]

        def loss(x: torch.Tensor, labels: list = labels, logits: Any = logits) -> torch.Tensor:
            return sum(
                torch.nn.functional.cross_entropy(o, y, reduction="none")
                for o, y in zip(logits(x), labels, strict=True)
            )

        generator = torch.Generator().manual_seed(inputs.preset.seed)
        adversarial = apgd(
            from_callable(loss), images, eps=eps, steps=steps, generator=generator, early_stop=False
        )
        readings[name] = (adversarial.detach(), clean, read(adversarial))
    return draw_reading_grid(path, images, truth, tasks, readings, eps)


def vlm_example_grid(
    inputs: ReportInputs, path: Path, *, count: int = 4, steps: int = 100, eps: float = HEADLINE_EPS
) -> Path:
    """Clean test images and each VLM's worst case at ``eps``, with the captions each model writes."""
    world = inputs.layout.world
    names = [m for m in VLM_MODELS if (inputs.layout.final(f"{m}-stage2") / "dvd_vlm.json").is_file()]
    if not names:
        raise FileNotFoundError("no trained VLM in the demo folder")
    scenes = [s for s in read_json(world / "images" / "scenes.json") if s["split"] == "test"]
    picked = _pick_scenes(scenes, count)
    images = torch.stack([_load_image(world / "images" / s["file_name"]) for s in picked])
    annotations = read_json(world / "captions" / "annotations.json")["annotations"]
    references = [next(a["caption"] for a in annotations if a["image_id"] == s["image_id"]) for s in picked]
    prompt = (
        instruct_caption_prompt(world / "llava" / "stage2_instruct.json") or "Describe the image briefly."
    )
    captions: dict[str, tuple[Any, list[str], list[str]]] = {}
    for name in names:
        model = load_vlm(inputs.layout.final(f"{name}-stage2"), device="cpu").eval()
        with torch.no_grad():
            clean = model.generate(images, prompt, max_new_tokens=20)
        generator = torch.Generator().manual_seed(inputs.preset.seed)
        adversarial = attack_answers(
            model, images, [prompt] * len(picked), references, eps=eps, steps=steps, generator=generator
        )
        with torch.no_grad():
            attacked = model.generate(adversarial, prompt, max_new_tokens=20)
        captions[name] = (adversarial, clean, attacked)
    return draw_caption_grid(path, images, references, captions, eps)


def draw_example_grid(inputs: ReportInputs, half: str) -> Path:
    """Draw the report's example grid of the CLIPs (``half`` ``clip``) or of the VLMs (``vlm``) where the
    layout keeps it, with the preset's attack steps; FileNotFoundError without the trained models."""
    path = inputs.layout.example_grid(half)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw = {"clip": example_grid, "vlm": vlm_example_grid}[half]
    return draw(inputs, path, steps=inputs.preset.example_steps)


def _pick_scenes(scenes: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Distinct colours and shapes, no distractor: easy to read at a glance."""
    chosen: list[dict[str, Any]] = []
    seen: set[str] = set()
    for s in scenes:
        if s.get("distractor") is None and s["color"] not in seen and s["shape"] not in seen:
            chosen.append(s)
            seen.update((s["color"], s["shape"]))
        if len(chosen) == count:
            break
    return chosen or scenes[:count]


def _truth(scene: dict[str, Any], task: str) -> str:
    return NUMBER_WORDS[scene["count"]] if task == "count" else str(scene[task])


def _load_image(path: Path) -> Any:
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
