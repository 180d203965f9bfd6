"""Step time and peak memory of LLaVA-style training: a clean step against Δ² steps (PGD-K, K = 1, 2, 3).

One process, one tiny model (open_clip ``dvd-tiny-vit`` tower -> ``mlp2x_gelu`` -> 2-layer Llama), one
batch of real ShapesWorld stage-2 conversations. Each variant runs the trainer's own step
(:class:`dvd.train.vlm_step.InstructionLoss`: for Δ², PGD-K on the images with frozen parameters, then the
training forward on the adversarial images), ``backward`` and an AdamW step, under the trainer's autocast
(bf16 on CUDA, fp32 on CPU). Variants are interleaved round-robin so machine noise hits them alike;
the median over the repeats is reported.

Peak memory is what a step adds on top of what is resident before it (weights, optimizer state, the
batch), after the warm-up steps: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocated memory
before the step; on CPU (Linux) the peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs``) minus the resident size before the step, measured for each variant in a
fresh process whose glibc maps blocks of 64 KiB and more directly and trims its heap, so that freed
tensors leave the resident set. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dvd.data.shapesworld import generate
from dvd.models.vlm import create_vlm
from dvd.train.attack import AttackSettings
from dvd.train.distributed import DistEnv
from dvd.train.loop import StepInfo
from dvd.train.precision import autocast, training_precision
from dvd.train.setup import adamw
from dvd.train.vlm_config import TINY_LLAMA
from dvd.train.vlm_data import build_conversations, resolve_source, shapesworld_tokenizer
from dvd.train.vlm_step import InstructionLoss, InstructionStep

EPS, STEP_SIZE = 4 / 255, 3 / 255
VARIANTS = {"clean": 0, "adv_k1": 1, "adv_k2": 2, "adv_k3": 3}


def build(batch_size: int, device: torch.device, world: Path):
    torch.manual_seed(0)
    source = resolve_source(str(world), "auto", None, 2)
    vlm = create_vlm("dvd-tiny-vit", dict(TINY_LLAMA), tokenizer=shapesworld_tokenizer(world),
                     template="vicuna_v1_short").to(device).train()
    collator = vlm.collator()
    data = build_conversations(source, image_size=vlm.image_size, collator=collator, caption_prompt="")
    images, batch = collator([data[i] for i in range(batch_size)])
    return vlm, images.to(device), batch.to(device)


def make_loss(vlm, steps: int, env: DistEnv) -> InstructionLoss:
    attack = None
    if steps:
        attack = AttackSettings(eps=EPS, step_size=STEP_SIZE, random_start=True, warmup_steps=0,
                                train_mode=True, seed=0)
    return InstructionLoss(model=InstructionStep(vlm), vlm=vlm, env=env, attack=attack, attack_steps=steps)


def glibc_returns_freed_memory() -> bool:
    """Make glibc map blocks >= 64 KiB directly and trim its heap, so freed tensors leave the RSS."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 64 * 1024) and libc.mallopt(m_trim_threshold, 64 * 1024))
    except (OSError, AttributeError):
        return False


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_added(step: Callable[[], None], device: torch.device) -> int:
    """Bytes ``step`` adds at its peak over what is live (CUDA) or resident (CPU) before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        return torch.cuda.max_memory_allocated(device) - before
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS")
    step()
    return _status_bytes("VmHWM") - before


def one_step(loss, optimizer, images, batch, precision: str, device: torch.device, step: int) -> None:
    """The optimizer step of ``dvd train vlm`` (autocast as :func:`dvd.train.loop.fit` sets it)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(precision, device):
        out = loss((images, batch), StepInfo(step, 0, False))
    out["loss"].float().backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(args: argparse.Namespace):
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    precision = training_precision("auto", device)
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "sw"
        generate(world, seed=0, size=16, image_size=32, eval_size=4, instruct_size=args.batch_size)
        vlm, images, batch = build(args.batch_size, device, world)
    optimizer = adamw(vlm, [p for p in vlm.parameters() if p.requires_grad], lr=1e-5)  # as the trainer
    losses = {name: make_loss(vlm, k, DistEnv(device=device)) for name, k in VARIANTS.items()}

    def step(name: str, index: int) -> None:
        one_step(losses[name], optimizer, images, batch, precision, device, index)

    return device, precision, vlm, batch, step


def cpu_peak_in_child(args: argparse.Namespace, name: str) -> int:
    """Peak of one variant in a fresh process (the RSS of this one keeps every earlier high-water mark)."""
    command = [sys.executable, __file__, "--memory-of", name, "--batch-size", str(args.batch_size),
               "--warmup", str(args.warmup), "--device", "cpu"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--memory-of", choices=tuple(VARIANTS), help=argparse.SUPPRESS)  # the CPU child
    args = parser.parse_args()
    if args.memory_of:  # measure one variant's CPU peak in this fresh process
        exact = glibc_returns_freed_memory()
        device, _, _, _, step = setup(args)
        for index in range(args.warmup):
            step(args.memory_of, index)
        peak = max(peak_added(lambda i=i: step(args.memory_of, args.warmup + i), device) for i in range(2))
        print(json.dumps({"peak_bytes": peak, "exact": exact}))
        return

    device, precision, vlm, batch, step = setup(args)
    for index in range(args.warmup):  # allocator, optimizer state, lazy initialisations
        for name in VARIANTS:
            step(name, index)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for name in VARIANTS:
            start = time.perf_counter()
            step(name, args.warmup + repeat)
            times[name].append(time.perf_counter() - start)
    peaks = {}
    for name in VARIANTS:
        if device.type == "cuda":
            peaks[name] = peak_added(lambda name=name: step(name, 0), device)
        else:
            peaks[name] = cpu_peak_in_child(args, name)
    result: dict[str, object] = {}
    for name in VARIANTS:
        result[f"{name}_s"] = round(statistics.median(times[name]), 6)
        result[f"{name}_peak_mb"] = round(peaks[name] / 2**20, 2)
        ms, mb = 1000 * result[f"{name}_s"], result[f"{name}_peak_mb"]
        print(f"{name:>8}: {ms:9.2f} ms/step   peak +{mb:8.2f} MiB")
    for k in (1, 2, 3):
        result[f"adv_k{k}_over_clean"] = round(result[f"adv_k{k}_s"] / result["clean_s"], 3)
    result.update(
        device=str(device), precision=precision, batch_size=args.batch_size,
        sequence_length=batch.input_ids.shape[1], image_tokens=vlm.num_image_tokens,
        threads=torch.get_num_threads(), repeats=args.repeats, torch=torch.__version__,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
