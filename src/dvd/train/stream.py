"""The training data as a stream of batches with a resumable position (segment, index).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from dvd.config import ConfigError
from dvd.train.distributed import DistEnv, all_true
from dvd.train.rng import derived_seed


class DataStream:
    """Batches from a loader rebuilt per *segment*, with a resumable position (segment, index).

    ``make_loader(segment)`` must return the same batches every time it is called with the same
    segment (seeded shuffle, seeded workers). A segment is one pass over the data (epoch mode,
    ``segment_length=None``) or ``segment_length`` batches of an endless resampled stream. On
    resume the loader of the saved segment is rebuilt and the batches already consumed in it are
    read and dropped: the cost is re-reading that part of one segment (none when resampled
    segments end at checkpoints). In epoch mode with several ranks the segment ends for all ranks
    as soon as one rank runs out, so every rank takes the same number of steps.
    """

    def __init__(
        self,
        make_loader: Callable[[int], Iterable[Any]],
        env: DistEnv,
        *,
        segment_length: int | None = None,
        name: str = "dataset",
        seed: int = 0,
    ) -> None:
        if segment_length is not None and segment_length < 1:
            raise ConfigError(f"segment length must be >= 1, got {segment_length}")
        self.make_loader = make_loader
        self.env = env
        self.segment_length = segment_length
        self.name = name
        self.segment = 0
        self.index = 0
        self.samples = 0
        self.seed = seed
        self._iterator: Iterator[Any] | None = None
        self._rng: torch.Tensor | None = None

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run data code (in-process transforms, loader set-up) on this stream's own torch RNG.

        Data randomness then depends only on (seed, rank, segment, index), never on what the
        training step drew, so skipping batches on resume replays it exactly.
        """
        outer = torch.get_rng_state()
        if self._rng is None:
            torch.default_generator.manual_seed(derived_seed(self.seed, self.env.rank, self.segment))
        else:
            torch.set_rng_state(self._rng)
        try:
            yield
        finally:
            self._rng = torch.get_rng_state()
            torch.set_rng_state(outer)

    def _open(self) -> None:
        self._rng = None
        with self._own_rng():
            self._iterator = iter(self.make_loader(self.segment))
        for skipped in range(self.index):
            with self._own_rng():
                item = next(self._iterator, None)
            if item is None:
                raise ValueError(
                    f"{self.name}: segment {self.segment} ended after {skipped} batches while resuming "
                    f"at batch {self.index}; the data changed since the checkpoint was written"
                )

    def _pull(self) -> Any | None:
        if self.segment_length is not None and self.index >= self.segment_length:
            return None
        with self._own_rng():
            batch = next(self._iterator, None) if self._iterator is not None else None
        if self.segment_length is None and self.env.distributed:
            if not all_true(batch is not None, self.env):
                return None
        return batch

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._open()
        batch = self._pull()
        if batch is None:
            empty = self.index == 0
            self.segment, self.index, self._iterator = self.segment + 1, 0, None
            if empty:
                raise ValueError(f"{self.name} yielded no batch; check the data path and the batch size")
            self._open()
            batch = self._pull()
            if batch is None:
                raise ValueError(f"{self.name} yielded no batch; check the data path and the batch size")
        self.index += 1
        self.samples += batch_size(batch)
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"segment": self.segment, "index": self.index, "samples": self.samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.segment, self.index = int(state["segment"]), int(state["index"])
        self.samples = int(state.get("samples", 0))
        self._iterator = None
        self._rng = None


def batch_size(batch: Any) -> int:
    """How many samples ``batch`` holds (its first tensor's leading dimension)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size(next(iter(batch.values())))
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):  # e.g. a VLMBatch of token ids
        return batch_size(getattr(batch, dataclasses.fields(batch)[0].name))
    return 1
