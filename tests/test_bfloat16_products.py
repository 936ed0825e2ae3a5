"""Gauss-Newton products under ``torch.autocast(bfloat16)`` against float32 ones, where the
outputs are confident softmaxes: the loss's curvature with respect to the outputs is taken in
float32 at float32 outputs, so the product is off by the layers' rounding only (about 0.5%
here), not by the softmax's (4-5% with the loss and its outputs in bfloat16)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import (
    ClassificationTask,
    Curvature,
    FunctionalModel,
    LanguageModelingTask,
    as_indexed,
)
from lightning_influence.core.task import Task

# A relative error this low rules out a bfloat16 loss: it puts these products 4-5% off.
TOLERANCE = 0.015


def _confident(kind: str) -> tuple[nn.Module, TensorDataset, Task]:
    """A model whose last layer is scaled up until its softmax puts 0.7-0.8 on the top class:
    a bigram language model (200 tokens) or an MLP classifier (50 classes)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "language_model":
        model = nn.Sequential(nn.Embedding(200, 32), nn.Linear(32, 200))
        data = TensorDataset(torch.randint(0, 200, (24, 12), generator=gen))
        task: Task = LanguageModelingTask()
    else:
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 50))
        x, y = torch.randn(64, 10, generator=gen), torch.randint(0, 50, (64,), generator=gen)
        data, task = TensorDataset(x, y), ClassificationTask()
    with torch.no_grad():
        model[-1].weight.mul_(20.0)
    return model.eval(), data, task


@pytest.mark.parametrize("kind", ["language_model", "classifier"])
def test_bfloat16_products_keep_the_loss_in_float32(kind: str) -> None:
    model, data, task = _confident(kind)
    fm = FunctionalModel(model, task)
    curvature = Curvature(fm, as_indexed(data), "gauss_newton")
    v = torch.randn(4, fm.n_params, generator=torch.Generator().manual_seed(2))
    exact = curvature.matvec(v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = curvature.matvec(v)
    assert low.dtype == torch.float32 and low.shape == v.shape
    with torch.no_grad():
        top = torch.softmax(model(data.tensors[0]), dim=-1).amax(dim=-1).mean()
    assert top > 0.6  # confident: the case a bfloat16 softmax gets wrong
    error = (low - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(error.max()) < TOLERANCE
    assert float(error.min()) > 1e-4  # the layers did run in bfloat16
