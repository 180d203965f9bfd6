"""Step time of ΔCLIP training against a clean step, a naive adversarial step, and its own bound.

One process, one model, one batch. Measured (median seconds per optimizer step, variants interleaved
round-robin so that machine noise hits all of them alike):

- ``clean``     open_clip contrastive step: both towers forward with grad, backward, AdamW step (fused, as the
                trainers).
- ``delta_kK``  dvd's ΔCLIP step (``dvd.train.clip.ContrastiveLoss``) with PGD-K: texts encoded once,
                K x (image-tower forward + input backward) with frozen parameters, then the clean step on
                the adversarial images.
- ``naive_k2``  the textbook adversarial step: at each of 2 attack steps the full model (text tower too)
                runs with parameters requiring grad and ``loss.backward()`` fills parameter gradients
                (zeroed before the training step), then the same training step.
- ``bound_k2``  clean + 2 x (image-tower forward + input backward), each part measured here.

The last line printed is one JSON object with these medians (``*_s``) and the ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from dvd.attacks.gradients import frozen_parameters, value_and_grad
from dvd.attacks.objectives import clip_contrastive
from dvd.models.clip import create_clip
from dvd.train.attack import AttackSettings
from dvd.train.clip_losses import ContrastiveLoss, ContrastiveStep, PixelEncoder
from dvd.train.clip_resolution import Phase, Resolution
from dvd.train.distributed import DistEnv
from dvd.train.loop import StepInfo
from dvd.train.setup import adamw

EPS = 4 / 255


def build(model_name: str, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    clip = create_clip(model_name)
    step = ContrastiveStep(clip).train()
    optimizer = adamw(clip, clip.parameters(), lr=1e-5)  # the trainers' optimizer (fused where possible)
    images = torch.rand(batch, 3, clip.image_size, clip.image_size)
    tokens = clip.tokenize(
        [f"a photo of {i % 4 + 1} red {['circles', 'squares'][i % 2]} number {i}" for i in range(batch)]
    )
    return clip, step, optimizer, images, tokens


def make_loss(clip, step, steps: int) -> ContrastiveLoss:
    phases = [Phase(0, 10**9, clip.image_size, steps)]
    attack = AttackSettings(
        eps=EPS, step_size=None, random_start=True, warmup_steps=0, train_mode=False, seed=0
    )
    return ContrastiveLoss(
        model=step, clip=clip, env=DistEnv(), phases=phases, resolution=Resolution(clip, phases),
        attack=attack, clean_loss_weight=0.0, local_loss=True, gather_with_grad=True,
    )


def clean_step(step, loss, optimizer, images, tokens) -> None:
    out = step(images, tokens)
    loss.clip_loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def delta_step(loss, optimizer, images, tokens, counter) -> None:
    counter[0] += 1
    loss((images, tokens), StepInfo(counter[0], 0, False))["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def naive_step(step, loss, optimizer, images, tokens, steps: int, generator: torch.Generator) -> None:
    alpha = 2.5 * EPS / max(steps, 2)
    x = (images + torch.empty_like(images).uniform_(-EPS, EPS, generator=generator)).clamp(0, 1)
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        out = step(x, tokens)  # the full model, text tower included, parameters requiring grad
        loss.clip_loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        x = torch.min(torch.max(x + alpha * x.grad.sign(), images - EPS), images + EPS).clamp(0, 1)
        optimizer.zero_grad(set_to_none=True)  # the attack's parameter gradients are thrown away
    clean_step(step, loss, optimizer, x.detach(), tokens)


def attack_unit(clip, images, tokens) -> float:
    """Seconds of one image-tower forward + input backward with frozen parameters (one PGD iteration)."""
    with torch.no_grad():
        text = clip.encode_text(tokens)  # outside the timing: the bound counts image-tower work only
    objective = clip_contrastive(PixelEncoder(clip), text, clip.logit_scale.detach())
    clip.eval()
    with frozen_parameters([clip]):
        start = time.perf_counter()
        value_and_grad(objective, images)
        elapsed = time.perf_counter() - start
    clip.train()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dvd-tiny-vit-64")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clip, step, optimizer, images, tokens = build(args.model, args.batch)
    losses = {k: make_loss(clip, step, k) for k in (1, 2, 3)}
    counter = [0]
    generator = torch.Generator().manual_seed(0)
    clip.train()

    variants = {
        "clean": functools.partial(clean_step, step, losses[2], optimizer, images, tokens),
        "delta_k1": functools.partial(delta_step, losses[1], optimizer, images, tokens, counter),
        "delta_k2": functools.partial(delta_step, losses[2], optimizer, images, tokens, counter),
        "delta_k3": functools.partial(delta_step, losses[3], optimizer, images, tokens, counter),
        "naive_k2": functools.partial(naive_step, step, losses[2], optimizer, images, tokens, 2, generator),
    }
    times: dict[str, list[float]] = {name: [] for name in [*variants, "attack_unit"]}
    for rep in range(args.warmup + args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if rep >= args.warmup:
                times[name].append(elapsed)
        unit = attack_unit(clip, images, tokens)
        if rep >= args.warmup:
            times["attack_unit"].append(unit)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {f"{name}_s": round(value, 6) for name, value in median.items()}
    result["bound_k2_s"] = round(median["clean"] + 2 * median["attack_unit"], 6)
    result["delta_k2_over_bound"] = round(median["delta_k2"] / result["bound_k2_s"], 4)
    result["naive_k2_over_delta_k2"] = round(median["naive_k2"] / median["delta_k2"], 4)
    result.update(
        model=args.model,
        batch=args.batch,
        repeats=args.repeats,
        threads=torch.get_num_threads(),
        device="cpu",
        torch=torch.__version__,
    )
    for name, value in median.items():
        print(f"{name:>12}: {value * 1000:9.2f} ms/step")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
