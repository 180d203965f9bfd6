"""Going through an evaluation set batch by batch, resumably, with the model in evaluation mode."""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dvd.eval.results import load_state, save_state


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients while evaluating; the caller's settings come back after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        yield
    finally:
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)
        model.train(was_training)


def run_batches(
    dataset: Any,
    evaluate_batch: Callable[[list[int], list[dict[str, Any]]], list[dict[str, Any]]],
    *,
    key: dict[str, Any],
    state_file: Path | None,
    batch_size: int,
    limit: int | None,
    label: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a map-style dataset of dict items in order, ``batch_size`` at a time.

    ``evaluate_batch(positions, items)`` returns one JSON-able record per item; records accumulate in
    ``state["samples"]``, saved atomically to ``state_file`` after every batch, so a rerun with the same
    ``key`` continues where an interrupted one stopped. Unreadable samples (None) are skipped and counted.
    """
    state = load_state(state_file, key)
    state.setdefault("samples", [])
    end = len(dataset) if limit is None else min(limit, len(dataset))
    bar = tqdm(
        total=end, initial=state["position"], desc=label, unit="sample", disable=not progress, file=sys.stderr
    )
    while not state["finished"] and state["position"] < end:
        tick = time.perf_counter()
        start = state["position"]
        stop = min(start + batch_size, end)
        read = [(i, dataset[i]) for i in range(start, stop)]
        items = [(i, item) for i, item in read if item is not None]
        if items:
            state["samples"] += evaluate_batch([i for i, _ in items], [item for _, item in items])
        state["skipped"] += stop - start - len(items)
        state["position"] = stop
        state["seconds"] += time.perf_counter() - tick
        save_state(state_file, state)
        bar.update(stop - start)
    state["finished"] = True
    save_state(state_file, state)
    bar.close()
    if not state["samples"]:
        raise ValueError(f"{label}: no readable samples; check the image directory")
    return state


def stream_batches(
    dataset: Any, batch_size: int, *, start: int, limit: int | None, workers: int
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(position, next_position, images, labels)`` over dataset positions ``start`` to ``limit``, in order.

    A position counts every sample read, corrupt ones (None, from map-style readers) included, so a
    resumed run restarts at the right sample; corrupt samples are left out of the batch.
    """
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
        samples = itertools.islice(loader, start, limit)
    else:
        end = len(dataset) if limit is None else min(limit, len(dataset))
        subset = torch.utils.data.Subset(dataset, range(start, end))
        samples = iter(torch.utils.data.DataLoader(subset, batch_size=None, num_workers=workers))
    position = start
    while True:
        chunk = list(itertools.islice(samples, batch_size))
        if not chunk:
            return
        good = [item for item in chunk if item is not None]
        images = torch.stack([image for image, _ in good]) if good else torch.empty(0)
        labels = torch.as_tensor([int(label) for _, label in good], dtype=torch.long)
        yield position, position + len(chunk), images, labels
        position += len(chunk)


def total_samples(dataset: Any, limit: int | None) -> int | None:
    size = len(dataset) if hasattr(dataset, "__len__") else None
    if size is None:
        return limit
    return size if limit is None else min(size, limit)
