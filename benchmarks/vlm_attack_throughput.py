"""Captioning-attack throughput: images/s of the caption attack ensemble at batch 1 vs batch 16, same model.

Times :func:`dvd.eval.vlm_attack.worst_case_attack` (clean caption, APGD against each reference caption,
the final APGD, a greedy caption after every attack) on the same images, once one image per call and
once ``--batch`` images per call (interleaved repeats, median); no image counts as broken, so both do the
same attack work. Without ``--model`` a tiny random VLM (open_clip ViT 32 px + 2-layer Llama) is built,
so it runs anywhere.
The last line printed is a JSON object with the result.

    python benchmarks/vlm_attack_throughput.py [--model DIR] [--images 16] [--batch 16] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import open_clip
import torch

from dvd.eval import vlm_attack as va
from dvd.models.vlm import VisionTower, build_tokenizer, create_vlm

CAPTIONS = [
    "A red circle next to a blue square.",
    "Two small green triangles on a white background.",
    "A large yellow star in the middle of the image.",
    "Three striped hexagons colored purple.",
    "There is one orange heart and a cyan diamond.",
]
PROMPT = "Describe the image."
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}


def tiny_vlm(device: str) -> va.VisionLanguageModel:
    torch.manual_seed(0)
    visual = open_clip.model._build_vision_tower(TINY_VIT["embed_dim"], TINY_VIT["vision_cfg"])
    tower = VisionTower(
        visual, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD, open_clip_cfg=TINY_VIT
    )
    tokenizer = build_tokenizer([*CAPTIONS, PROMPT])
    return create_vlm(
        tower, TINY_LLAMA, tokenizer=tokenizer, template="vicuna_v1_short", device=device
    ).eval()


def attack_all(
    model, images, batch: int, *, eps: float, steps: int, references: int, tokens: int
) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) to run the caption ensemble over ``images`` ``batch`` at a time."""
    stages = va.ensemble_stages(references, precision=va.resolve_precision("auto", images.device))
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    sync()
    cpu, start = time.process_time(), time.perf_counter()
    for first in range(0, images.shape[0], batch):
        x = images[first : first + batch]
        va.worst_case_attack(
            model,
            x,
            [PROMPT] * x.shape[0],
            [CAPTIONS] * x.shape[0],
            lambda index, texts: [1.0] * len(texts),  # nothing ever counts as broken: fixed work
            eps=eps,
            steps=steps,
            stages=stages,
            broken_at=-math.inf,
            generator=torch.Generator(device=images.device).manual_seed(first),
            max_new_tokens=tokens,
        )
    sync()
    return time.process_time() - cpu, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="a dvd VLM checkpoint or HF LLaVA (default: tiny random)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="APGD iterations per attack run")
    parser.add_argument("--references", type=int, default=2, help="reference captions attacked per image")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timings per batch size (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = tiny_vlm(args.device) if args.model is None else va.load_model(args.model, device=args.device)
    model.requires_grad_(False)
    size = model.image_size
    images = torch.rand(args.images, 3, size, size, generator=torch.Generator().manual_seed(0)).to(
        args.device
    )
    settings = dict(eps=4 / 255, steps=args.steps, references=args.references, tokens=args.max_new_tokens)
    attack_all(model, images[:2], 2, **settings)  # warm-up (allocations, kernels)
    timings: dict[int, list[tuple[float, float]]] = {1: [], args.batch: []}
    for _ in range(args.repeats):  # interleaved, so that a load change on a shared machine hits both
        for b in timings:
            timings[b].append(attack_all(model, images, b, **settings))
    # on CPU the process time keeps other jobs' load out of the number; on a GPU wall time is the measure
    timer = 0 if args.device == "cpu" else 1
    seconds = {b: statistics.median(t[timer] for t in ts) for b, ts in timings.items()}
    wall = {b: statistics.median(t[1] for t in ts) for b, ts in timings.items()}
    rate = {b: args.images / s for b, s in seconds.items()}
    for b in seconds:
        kind = "CPU" if timer == 0 else "wall"
        print(
            f"batch {b:>3}: {seconds[b]:7.2f} s {kind} (median; wall {wall[b]:.2f} s) "
            f"for {args.images} images = {rate[b]:7.3f} images/s"
        )
    result = {
        "benchmark": "vlm_caption_attack_throughput",
        "model": args.model or "tiny-random-vlm (ViT 32px 3x32, Llama 2x64)",
        "device": args.device
        if args.device != "cpu"
        else f"cpu ({platform.processor() or 'x86'}, {args.threads} thread{'s' if args.threads > 1 else ''})",
        "images": args.images,
        "apgd_runs_per_image": args.references + 1,
        "steps": args.steps,
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "images_per_s_batch_1": round(rate[1], 4),
        f"images_per_s_batch_{args.batch}": round(rate[args.batch], 4),
        "speedup": round(rate[args.batch] / rate[1], 2),
        "timer": "process_time" if timer == 0 else "wall",
        "wall_speedup": round(wall[1] / wall[args.batch], 2),
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
