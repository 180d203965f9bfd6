"""Models a training builds from random weights on purpose, without open_clip's "No pretrained weights
loaded ... initialized randomly" warning: for pre-training that is the plan, not a problem."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

RANDOM_INIT_WARNING = "No pretrained weights loaded"


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(RANDOM_INIT_WARNING)


@contextlib.contextmanager
def random_init_expected() -> Iterator[None]:
    """Within the block, open_clip's random-initialisation warning (a root-logger record) is dropped."""
    root = logging.getLogger()
    drop = _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
