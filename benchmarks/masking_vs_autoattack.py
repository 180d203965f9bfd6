"""Masked and randomised defences: dvd's robust accuracy next to pyautoattack's on the same model.

A small CNN trained on scikit-learn's digits (fixed seeds) is wrapped four ways: plain, input quantisation
inside the forward (``round(x*255)/255``), a detached middle layer, and Gaussian input noise (a randomised
defence). Each is attacked at L-inf ``--eps`` by dvd's default ensemble (APGD-CE + APGD-T with its masking
checks and escalation) and by the reference: pyautoattack's standard version (APGD-CE, APGD-T, FAB-T,
Square 5000) for the deterministic models, its Square Attack alone where the standard version cannot run
(the detached model has no gradient to the input), and its ``rand`` version (APGD-CE + APGD-DLR with EOT 20)
for the noisy model, scored over 10 fresh draws as dvd scores it. The last line printed is a JSON object.

    python benchmarks/masking_vs_autoattack.py --n 100
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from attack_throughput import digits, small_cnn, train  # the throughput benchmark's CNN and data
from pyautoattack import AutoAttack
from torch import nn

from dvd.attacks import evaluate_robustness
from dvd.attacks.escalation import fresh_draw_accuracy


class Quantised(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 255) / 255)


class Detached(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model[2:](self.model[:2](x).detach())


class Noisy(nn.Module):
    def __init__(self, model: nn.Module, sigma: float = 0.3) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def reference(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[str, float]:
    if name == "detached":  # no input gradient: the standard version crashes, its Square runs alone
        aa = AutoAttack(model, version="custom", attacks=["square"], eps=eps, seed=0)
        aa.square.n_queries = 5000
        return "square-5000", accuracy(model, aa.run_standard_evaluation(x, y, batch_size=len(y))[0], y)
    if name == "noisy":
        aa = AutoAttack(model, version="rand", eps=eps, seed=0)
        adversarial = aa.run_standard_evaluation(x, y, batch_size=len(y))[0]
        return "rand", float(fresh_draw_accuracy(model, adversarial, y, 10, len(y)).mean())
    aa = AutoAttack(model, version="standard", eps=eps, seed=0)
    return "standard", accuracy(model, aa.run_standard_evaluation(x, y, batch_size=len(y))[0], y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100, help="test digits attacked")
    parser.add_argument("--eps", type=float, default=24 / 255)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    x_train, y_train, x, y = digits()
    x, y = x[: args.n], y[: args.n]
    torch.manual_seed(0)
    cnn = train(small_cnn(), x_train, y_train)
    models = {"plain": cnn, "quantised": Quantised(cnn), "detached": Detached(cnn), "noisy": Noisy(cnn)}
    results = {}
    for name, model in models.items():
        model.eval()
        torch.manual_seed(0)
        start = time.perf_counter()
        ours = evaluate_robustness(model, x, y, eps=args.eps, attacks=("apgd-ce", "apgd-t"))
        ours_s = time.perf_counter() - start
        escalated = bool(ours.flags.get("escalated"))
        start = time.perf_counter()
        version, theirs = reference(name, model, x, y, args.eps)
        results[name] = {
            "dvd": round(100 * ours.robust_accuracy, 2),
            "dvd_escalated": escalated,
            "dvd_randomized": bool(ours.flags.get("randomized")),
            "reference": round(100 * theirs, 2),
            "reference_version": version,
            "dvd_s": round(ours_s, 1),
            "reference_s": round(time.perf_counter() - start, 1),
        }
        print(name, results[name], flush=True)
    print(json.dumps({"n": args.n, "eps": args.eps, "results": results}))


if __name__ == "__main__":
    main()
