"""Length-grouped batches (Hugging Face's ``group_by_length``, LLaVA's ``group_by_length`` /
``group_by_modality_length``): each batch holds conversations of similar length, so little of a step is
spent on padding.

An epoch's order is drawn as usual (a seeded permutation), cut into *megabatches* of up to
:data:`MEGABATCH_BATCHES` global batches, each sorted by length and cut into global batches; the global
batches are then shuffled, so long and short ones come in random order rather than in a pattern. Under
``torchrun`` a global batch is ``world_size`` per-rank batches of neighbouring lengths, and rank ``r``
takes the ``r``-th of each.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MEGABATCH_BATCHES = 50  # global batches sorted together (Hugging Face's mega_batch_mult)


def length_grouped(order: torch.Tensor, lengths: Sequence[int], *, batch_size: int, world_size: int,
                   generator: torch.Generator) -> torch.Tensor:
    """``order`` (a permutation of sample indices) regrouped: every ``batch_size`` run of the result is one
    rank's batch of similar lengths, rank by rank within each global batch; a final incomplete global batch
    is dropped, as ``drop_last`` would."""
    size = batch_size * world_size
    batches = len(order) // size
    if batches == 0:
        return order[:0]
    # at least four megabatches where the data allows, as Hugging Face's sampler does
    per_mega = max(1, min(MEGABATCH_BATCHES, batches // 4))
    kept = order[: batches * size]
    length = torch.as_tensor(lengths, dtype=torch.long)[kept]
    grouped = []
    for start in range(0, len(kept), per_mega * size):
        part = slice(start, start + per_mega * size)
        rank = torch.sort(length[part], descending=True, stable=True).indices
        grouped.append(kept[part][rank])
    global_batches = torch.cat(grouped).view(batches, size)
    return global_batches[torch.randperm(batches, generator=generator)].flatten()


def rank_share(order: torch.Tensor, *, batch_size: int, world_size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s part of a :func:`length_grouped` order: its batch of every global batch."""
    return order.view(-1, world_size, batch_size)[:, rank].flatten()
