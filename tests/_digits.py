"""scikit-learn's 8x8 digits and small classifiers trained on them here: the models the attack-strength
tests attack (dvd's attacks against pyautoattack's)."""

from __future__ import annotations

import torch
from torch import nn

TOLERANCE = 0.005  # half a percentage point


def digits(n_test: int = 200) -> tuple[torch.Tensor, ...]:
    """``x_train, y_train, x_test, y_test``: 1400 training digits and ``n_test`` test digits, in [0, 1]."""
    from sklearn.datasets import load_digits  # deferred: scikit-learn is slow to import

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (B, 1, 8, 8) in [0, 1]
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:1400 + n_test]
    return x[train], y[train], x[test], y[test]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 15) -> nn.Module:
    """Adam, batches of 128, a fixed shuffle order; returns the model in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=order)
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Clean top-1 accuracy."""
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())
