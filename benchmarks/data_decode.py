"""CPU time of the training data path per batch: streamed and decoded every epoch vs decoded once.

CLIP: ``dvd train clip``'s loader over a ShapesWorld root, streamed (tar reading, shuffle buffer,
PNG decoding and the transform for every sample of every epoch) and with ``in_memory=true`` (one pass at
start, counted separately, then 8-bit tensors). VLM: stage-2 batches of the same world's conversations,
each conversation tokenised anew in every epoch (the collator alone) and tokenised once (the dataset's
``"encoded"``, reused). Process CPU time, one thread, ``--batches`` batches after one warm-up batch; the last
line printed is one JSON object.

    python benchmarks/data_decode.py --world runs/demo/world
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch

from dvd.config import load_config
from dvd.models.vlm import create_vlm
from dvd.train.clip import load_start_model
from dvd.train.clip_config import ClipTrainConfig, check_config
from dvd.train.clip_data import build_dataset, make_loader_factory
from dvd.train.distributed import DistEnv
from dvd.train.vlm_config import TINY_LLAMA
from dvd.train.vlm_data import build_conversations, resolve_source, shapesworld_tokenizer


def _per_batch(batches: Any, count: int) -> float:
    next(batches)  # warm-up
    start = time.process_time()
    for _ in range(count):
        next(batches)
    return (time.process_time() - start) / count


def clip_batches(world: Path, *, in_memory: bool, batch_size: int, count: int) -> dict[str, float]:
    cfg = check_config(load_config(ClipTrainConfig, None, [
        f"data={world}", "recipe=clean", "augment=false", "shuffle_buffer=2000", f"batch_size={batch_size}",
        f"in_memory={str(in_memory).lower()}", "output_dir=/tmp/unused",
    ]))
    clip = load_start_model(cfg, torch.device("cpu"))
    start = time.process_time()
    dataset, collate, _ = build_dataset(cfg, clip)
    setup = time.process_time() - start
    loader = make_loader_factory(dataset, cfg=cfg, env=DistEnv(), collate=collate)
    batches = itertools.chain.from_iterable(loader(epoch) for epoch in itertools.count())
    return {"setup_s": setup, "batch_ms": 1e3 * _per_batch(batches, count)}


def vlm_batches(world: Path, *, encoded: bool, batch_size: int, count: int) -> dict[str, float]:
    source = resolve_source(str(world), "auto", None, 2)
    vlm = create_vlm("dvd-tiny-vit", dict(TINY_LLAMA), tokenizer=shapesworld_tokenizer(world),
                     template="vicuna_v1_short")
    collator = vlm.collator()
    data = build_conversations(source, image_size=vlm.image_size, collator=collator, caption_prompt="")

    def batches() -> Any:
        for epoch in itertools.count():
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch)).tolist()
            for first in range(0, len(order) - batch_size + 1, batch_size):
                samples = [data[i] for i in order[first : first + batch_size]]
                if not encoded:
                    samples = [{k: v for k, v in s.items() if k != "encoded"} for s in samples if s]
                yield collator([s for s in samples if s])

    stream = batches()
    if encoded:  # the steady state: every conversation read (and tokenised) once already
        for _ in range(len(data) // batch_size):
            next(stream)
    return {"batch_ms": 1e3 * _per_batch(stream, count)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, required=True, help="a ShapesWorld root (dvd data shapesworld)")
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {
        "clip_streamed": clip_batches(args.world, in_memory=False, batch_size=64, count=args.batches),
        "clip_in_memory": clip_batches(args.world, in_memory=True, batch_size=64, count=args.batches),
        "vlm_tokenised_per_epoch": vlm_batches(args.world, encoded=False, batch_size=16, count=args.batches),
        "vlm_tokenised_once": vlm_batches(args.world, encoded=True, batch_size=16, count=args.batches),
    }
    for name, row in result.items():
        print(f"{name:26s} " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
