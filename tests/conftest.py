"""Suite-wide settings: one intra-op thread.

The test models are tiny; on a 2-core machine extra torch threads only add contention
(several times slower), and subprocesses (torchrun, CLI runs) inherit the setting.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
