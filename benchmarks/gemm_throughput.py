"""fp32 GEMM throughput on a CPU: PyTorch's ``torch.mm`` (its BLAS, MKL in the official wheels) vs oneDNN's
matmul (``dvd.onednn_linear``), side by side in one process, at the shapes of the demo's linear layers.

Per shape ``[M, K] @ [K, N]``, the two kernels alternate over ``--repeats`` rounds of ``--iters`` calls; the
median GFLOP/s is printed, then one JSON line. One thread by default (the demo's workers run one each).

    python benchmarks/gemm_throughput.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dvd.onednn_linear import _mm_t, available

# (M, K, N): the CLIP tower's MLP and attention projections (batch 64 x 17 tokens), their gradients, the
# text tower's MLP (64 x 32 tokens), the VLM's language model (about 2,400 tokens a batch)
SHAPES = [(1088, 128, 512), (1088, 512, 128), (512, 1088, 128), (1088, 128, 384), (2048, 64, 256),
          (2400, 128, 384), (1024, 1024, 1024)]


def seconds_per_call(fn, iters: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not available():
        parser.error("this PyTorch has no oneDNN")
    torch.set_num_threads(args.threads)
    summary: dict[str, object] = {"threads": args.threads,
                                  "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        b_t = b.t().contiguous()  # oneDNN's linear takes the weight as [N, K]
        kernels = {"torch.mm": lambda a=a, b=b: torch.mm(a, b), "onednn": lambda a=a, b_t=b_t: _mm_t(a, b_t)}
        rates: dict[str, list[float]] = {name: [] for name in kernels}
        for round_ in range(args.repeats):
            for name in (list(kernels) if round_ % 2 == 0 else list(kernels)[::-1]):
                rates[name].append(2 * m * k * n / seconds_per_call(kernels[name], args.iters) / 1e9)
        mm, dnn = (statistics.median(rates[name]) for name in kernels)
        diff = (torch.mm(a, b) - _mm_t(a, b_t)).abs().max().item() / torch.mm(a, b).abs().max().item()
        summary[f"{m}x{k}x{n}"] = {"torch_mm_gflops": round(mm, 1), "onednn_gflops": round(dnn, 1),
                                   "ratio": round(dnn / mm, 2), "max_rel_diff": float(f"{diff:.1e}")}
        print(f"[{m}, {k}] @ [{k}, {n}]  torch.mm {mm:6.1f}  oneDNN {dnn:6.1f} GFLOP/s  -> {dnn / mm:.2f}x"
              f"  (max relative difference {diff:.1e})", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
