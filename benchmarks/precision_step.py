"""Training step time in fp32 vs bf16 autocast, or fp32 with PyTorch's own linear layers vs oneDNN's
(``--compare linear``, :mod:`dvd.onednn_linear`), on the demo's own recipes.

Takes a finished ``dvd demo`` folder (its world, its configs and its stage-1 VLMs) and, for each recipe,
runs ``dvd train clip|vlm --config <demo config> steps=N`` once per variant in a fresh process, the
variants alternating, ``--repeats`` rounds; the time per step is the trainer's own fit time
(``summary.json``'s ``seconds``: no start-up, no data decoding) over N. The last line printed is one JSON
object with the medians (ms per step) and the first variant's over the second's per recipe.

    python benchmarks/precision_step.py --demo runs/demo --steps 100 --repeats 3
    python benchmarks/precision_step.py --demo runs/demo --compare linear --recipes clean-clip,delta-clip
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dvd.onednn_linear import ENV as ONEDNN_ENV

# recipe: (trainer, config name, overrides that keep a short run representative of the whole one)
RECIPES = {
    "clean-clip": ("clip", "clean-clip", ["warmup_steps=10"]),
    "delta-clip": ("clip", "delta-clip", ["warmup_steps=10", "eps_warmup_steps=0"]),
    "tecoa": ("clip", "tecoa", ["warmup_steps=10"]),
    "fare": ("clip", "fare", ["warmup_steps=10"]),
    "clean-llava stage2": ("vlm", "clean-llava-stage2", []),
    "delta2-llava stage2": ("vlm", "delta2-llava-stage2", ["eps_warmup_steps=0"]),
}
# what is compared: variant -> (the run's precision, its environment)
COMPARISONS = {
    "precision": {"fp32": ("fp32", {}), "bf16": ("bf16", {})},
    "linear": {"aten": ("fp32", {ONEDNN_ENV: "0"}), "onednn": ("fp32", {ONEDNN_ENV: "1"})},
}


def run_once(
    demo: Path, recipe: str, comparison: str, variant: str, steps: int, threads: int, scratch: Path
) -> float:
    """Milliseconds per step of one fresh ``dvd train`` run of ``variant`` of ``COMPARISONS[comparison]``."""
    trainer, config, overrides = RECIPES[recipe]
    precision, extra_env = COMPARISONS[comparison][variant]
    out = scratch / f"{config}-{variant}"
    config_file = demo / "configs" / f"{config}.yaml"
    argv = [sys.executable, "-m", "dvd.cli", "train", trainer, "--config", str(config_file), f"steps={steps}",
            f"output_dir={out}", "resume=none", "checkpoint_every=1000000", "log_every=1000000",
            f"precision={precision}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **extra_env}
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return 1000 * json.loads((out / "summary.json").read_text())["seconds"] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished demo folder, e.g. runs/demo")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per run (the demo's workers: 1)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--compare", choices=list(COMPARISONS), default="precision",
                        help="fp32 vs bf16 (precision), or fp32 linear layers by PyTorch vs oneDNN (linear)")
    args = parser.parse_args()
    variants = COMPARISONS[args.compare]
    first, second = variants
    recipes = [r.strip() for r in args.recipes.split(",")]
    missing = [r for r in recipes if r not in RECIPES]
    if missing:
        parser.error(f"unknown recipe(s) {missing}; choose from {list(RECIPES)}")
    times: dict[str, dict[str, list[float]]] = {r: {v: [] for v in variants} for r in recipes}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for round_ in range(args.repeats):
            for recipe in recipes:
                order = (first, second) if round_ % 2 == 0 else (second, first)
                for name in order:
                    ms = run_once(args.demo, recipe, args.compare, name, args.steps, args.threads, scratch)
                    times[recipe][name].append(ms)
                    print(f"round {round_}  {recipe:20s} {name}: {ms:7.1f} ms/step", flush=True)
    summary: dict[str, object] = {"compare": args.compare, "steps": args.steps, "repeats": args.repeats,
                                  "threads": args.threads}
    for recipe in recipes:
        a, b = (statistics.median(times[recipe][v]) for v in (first, second))
        summary[recipe] = {f"{first}_ms": round(a, 1), f"{second}_ms": round(b, 1),
                           f"{first}_over_{second}": round(a / b, 2)}
        print(f"{recipe:20s} {first} {a:7.1f}  {second} {b:7.1f}  ms/step  -> {a / b:.2f}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
