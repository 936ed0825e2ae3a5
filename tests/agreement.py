"""How closely two sets of scores agree: the correlations the accuracy tests assert on."""

from __future__ import annotations

import torch
from torch import Tensor


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of the flattened tensors (in float64)."""
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman correlation: Pearson's on the ranks (ties broken by position)."""

    def ranks(x: Tensor) -> Tensor:
        return torch.argsort(torch.argsort(x.flatten())).double()

    return pearson(ranks(a), ranks(b))
