"""Suite-wide settings and shared fixtures.

One intra-op thread: the test models are tiny; on a 2-core machine extra torch threads only add
contention (several times slower), and subprocesses (torchrun, CLI runs) inherit the setting.
``shapesworld`` is one small world generated once per session for every test that only reads it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from dvd.data.shapesworld import generate  # noqa: E402

torch.set_num_threads(1)

# 96 pre-training pairs in 4 shards, 20 held-out images per task, 32 px: seconds to write
SHAPESWORLD = {"seed": 0, "size": 96, "image_size": 32, "eval_size": 20, "shard_size": 24}


@pytest.fixture(scope="session")
def shapesworld(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ShapesWorld root shared by the session; tests must not write into it."""
    root = tmp_path_factory.mktemp("shapesworld") / "sw"
    generate(root, **SHAPESWORLD)
    return root
