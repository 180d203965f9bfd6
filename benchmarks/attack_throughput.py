"""Attack throughput: dvd's APGD-CE and APGD-CE + APGD-T ensemble vs pyautoattack's, same model and data.

A small CNN is trained here on scikit-learn's digits (8x8 grey images in [0, 1], fixed seed, seconds
on a CPU); both libraries then attack the same test images in one batch, in one process, and each
run's robust accuracy is measured by the same fp32 forward. Runs alternate and the fastest of
``--repeats`` counts. Time is process CPU time with one intra-op thread by default, so that other
jobs on a shared machine do not leak into the numbers (wall time is reported too).

    python benchmarks/attack_throughput.py [--eps 0.1] [--repeats 3] [--threads 1]

The last line printed is one JSON object (images/s, robust accuracies, ratios).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from torch import nn

from dvd.attacks import apgd_attack, cross_entropy, evaluate_robustness


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/test split of the digits as (B, 1, 8, 8) images in [0, 1]."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 15, seed: int = 0):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=order)
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


STEPS = 100  # APGD iterations, as in AutoAttack's standard version


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    """CPU and wall seconds of one run, and its output."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, out


def main() -> None:
    parser = argparse.ArgumentParser(prog="attack_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--eps", type=float, default=0.1, help="L-inf budget in pixel units (default 0.1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    from pyautoattack import AutoAttack  # the reference (pip install pyautoattack)

    x_train, y_train, x, y = digits(args.seed)
    torch.manual_seed(args.seed)  # initialisation
    model = train(small_cnn(), x_train, y_train, seed=args.seed)
    n = x.shape[0]

    def accuracy(images: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(images).argmax(1) == y).float().mean())

    def reference(attacks: list[str]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            aa = AutoAttack(model, attacks=attacks, version="custom", eps=args.eps, seed=args.seed)
            aa.verbose = False
            aa.apgd.n_restarts = 1  # AutoAttack's standard version for L-inf
            aa.apgd_targeted.n_restarts, aa.apgd_targeted.n_target_classes = 1, 9
            return aa.run_standard_evaluation(x, y, batch_size=n)[0]
        return run

    def ours(attacks: tuple[str, ...]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            return evaluate_robustness(model, x, y, eps=args.eps, attacks=attacks, steps=STEPS,
                                       seed=args.seed, check=False).adversarial
        return run

    def ours_without_early_stop() -> torch.Tensor:
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        result = apgd_attack(cross_entropy(model, y[correct]), x[correct], eps=args.eps, steps=STEPS,
                             generator=torch.Generator().manual_seed(args.seed), early_stop=False)
        with torch.no_grad():
            broken = model(result.adversarial).argmax(1) != y[correct]
        adversarial = x.clone()
        adversarial[correct.nonzero()[:, 0][broken]] = result.adversarial[broken]
        return adversarial

    runs = {
        "reference_apgd_ce": reference(["apgd-ce"]),
        "ours_apgd_ce": ours(("apgd-ce",)),
        "ours_apgd_ce_no_early_stop": ours_without_early_stop,
        "reference_ensemble": reference(["apgd-ce", "apgd-t"]),
        "ours_ensemble": ours(("apgd-ce", "apgd-t")),
    }
    rows = {name: {"cpu": float("inf"), "wall": float("inf")} for name in runs}
    for _ in range(args.repeats):  # alternate the runs so that drifting load hits every one of them
        for name, fn in runs.items():
            cpu, wall, adversarial = timed(fn)
            rows[name]["cpu"] = min(rows[name]["cpu"], cpu)
            rows[name]["wall"] = min(rows[name]["wall"], wall)
            rows[name]["robust_acc"] = accuracy(adversarial)
            linf = float((adversarial - x).abs().flatten(1).amax(1).max())
            assert linf <= args.eps + 1e-6, f"{name} left the eps-ball ({linf})"

    print(f"digits test set: {n} images, clean accuracy {accuracy(x):.4f}, eps {args.eps:g} (L-inf), "
          f"{STEPS} steps, {args.threads} thread(s), torch {torch.__version__}, {platform.processor()}")
    print(f"{'run':28s} {'images/s (cpu)':>15s} {'images/s (wall)':>16s} {'robust acc':>11s}")
    for name, row in rows.items():
        print(f"{name:28s} {n / row['cpu']:15.1f} {n / row['wall']:16.1f} {row['robust_acc']:11.4f}")

    def ips(name: str, clock: str = "cpu") -> float:
        return round(n / rows[name][clock], 2)

    summary = {
        "ours_images_per_s": ips("ours_apgd_ce"),
        "reference_images_per_s": ips("reference_apgd_ce"),
        "speedup": round(rows["reference_apgd_ce"]["cpu"] / rows["ours_apgd_ce"]["cpu"], 3),
        "ours_robust_acc": rows["ours_apgd_ce"]["robust_acc"],
        "reference_robust_acc": rows["reference_apgd_ce"]["robust_acc"],
        "ours_no_early_stop_images_per_s": ips("ours_apgd_ce_no_early_stop"),
        "ours_no_early_stop_robust_acc": rows["ours_apgd_ce_no_early_stop"]["robust_acc"],
        "ours_ensemble_images_per_s": ips("ours_ensemble"),
        "reference_ensemble_images_per_s": ips("reference_ensemble"),
        "ensemble_speedup": round(rows["reference_ensemble"]["cpu"] / rows["ours_ensemble"]["cpu"], 3),
        "ours_ensemble_robust_acc": rows["ours_ensemble"]["robust_acc"],
        "reference_ensemble_robust_acc": rows["reference_ensemble"]["robust_acc"],
        "ours_images_per_s_wall": ips("ours_apgd_ce", "wall"),
        "reference_images_per_s_wall": ips("reference_apgd_ce", "wall"),
        "timer": "process_time",
        "threads": args.threads,
        "n": n,
        "eps": args.eps,
        "steps": STEPS,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
