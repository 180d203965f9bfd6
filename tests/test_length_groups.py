"""Length-grouped batches (``group_by_length``): the same samples as the plain order, less padding, in a
seeded random order, one batch of each global batch per rank; a VLM's conversations measured from their
text alone."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dvd.train.length_groups import length_grouped, rank_share


def grouped(lengths: list[int], batch_size: int, world_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed))
    regrouped = length_grouped(order, lengths, batch_size=batch_size, world_size=world_size,
                               generator=torch.Generator().manual_seed(seed + 1))
    return order, regrouped


def padded(lengths: list[int], order: torch.Tensor, batch_size: int) -> int:
    """Tokens a pass over ``order`` in batches of ``batch_size`` computes, padding included."""
    batches = torch.as_tensor(lengths)[order].view(-1, batch_size)
    return int(batches.max(dim=1).values.sum()) * batch_size


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=0, max_size=400),
    batch_size=st.integers(1, 9),
    world_size=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_grouping_keeps_the_samples_drops_what_drop_last_would_and_never_pads_more(
    lengths: list[int], batch_size: int, world_size: int, seed: int
) -> None:
    order, regrouped = grouped(lengths, batch_size, world_size, seed)
    size = batch_size * world_size
    kept = len(lengths) // size * size
    assert sorted(regrouped.tolist()) == sorted(order[:kept].tolist())  # the plain epoch's samples
    if kept:
        assert padded(lengths, regrouped, batch_size) <= padded(lengths, order[:kept], batch_size)
        shares = [rank_share(regrouped, batch_size=batch_size, world_size=world_size, rank=r)
                  for r in range(world_size)]
        assert sorted(torch.cat(shares).tolist()) == sorted(regrouped.tolist())  # disjoint, complete
        assert all(len(s) == kept // world_size for s in shares)  # the same number of steps on every rank


def test_batches_hold_similar_lengths_in_random_order_and_the_seed_fixes_it() -> None:
    lengths = torch.randint(100, 161, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    order, regrouped = grouped(lengths, 16, 1)
    assert padded(lengths, regrouped, 16) < 0.9 * padded(lengths, order, 16)  # the padding is mostly gone
    longest = torch.as_tensor(lengths)[regrouped].view(-1, 16).max(dim=1).values
    assert not torch.equal(longest, longest.sort(descending=True).values)  # not long-to-short
    assert torch.equal(regrouped, grouped(lengths, 16, 1)[1])
    assert not torch.equal(regrouped, grouped(lengths, 16, 1, seed=1)[1])


def test_each_rank_takes_neighbouring_lengths_of_every_global_batch() -> None:
    lengths = list(range(64))
    _, regrouped = grouped(lengths, 4, 2)
    first, second = (rank_share(regrouped, batch_size=4, world_size=2, rank=r) for r in (0, 1))
    for step in range(len(first) // 4):
        one, two = (torch.as_tensor(lengths)[s[step * 4:(step + 1) * 4]] for s in (first, second))
        assert int(one.min()) >= int(two.max())  # the two halves of one run sorted longest first
