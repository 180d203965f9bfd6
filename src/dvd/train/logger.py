"""Training metrics: TensorBoard scalars and a progress bar with ETA, on rank 0 only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from dvd.train.distributed import DistEnv


class MetricLogger:
    """TensorBoard scalars and a tqdm bar with ETA, on rank 0 only."""

    def __init__(
        self,
        log_dir: str | Path | None,
        env: DistEnv,
        *,
        total: int,
        start: int = 0,
        progress: bool = True,
        description: str = "train",
    ) -> None:
        self.env = env
        self.writer = None
        self.bar = None
        if not env.is_main:
            return
        if log_dir is not None:
            # deferred on purpose: TensorBoard's writer pulls in protobuf and its plugins (seconds)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
        if progress:
            self.bar = tqdm(total=total, initial=start, desc=description, dynamic_ncols=True)

    def log(self, step: int, scalars: dict[str, float], *, show: Sequence[str] = ()) -> None:
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if self.bar is not None and show:
            self.bar.set_postfix({k.split("/")[-1]: f"{scalars[k]:.4g}" for k in show if k in scalars})

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
