"""Reference models: scikit-learn's digits and models trained to their optimum.

Tests reach them through the fixtures of ``tests/conftest.py`` (``digits``, ``fit_lbfgs``,
``refit_without``, ``digits_models``); the benchmarks import them directly.
"""

from __future__ import annotations

import copy

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import TensorDataset


def digits(
    n_train: int = 1200, dtype: torch.dtype = torch.float64
) -> tuple[TensorDataset, TensorDataset]:
    """Standardised digits: ``n_train`` shuffled points to train on, the rest to validate."""
    x, y = load_digits(return_X_y=True)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    x = torch.as_tensor(x, dtype=dtype)[perm]
    y = torch.as_tensor(y, dtype=torch.long)[perm]
    mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1.0)
    x = (x - mean) / std
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def logistic_regression() -> nn.Module:
    return nn.Linear(64, 10).double()


def mlp(hidden: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()


def fit_lbfgs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    weight_decay: float,
    max_iter: int = 500,
    tol: float = 1e-10,
) -> nn.Module:
    """Minimise mean cross-entropy + (weight_decay / 2) * ||theta||^2 with full-batch L-BFGS."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params,
        lr=1,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss = loss + 0.5 * weight_decay * sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    for _ in range(20):
        opt.step(closure)
        gnorm = torch.cat([p.grad.reshape(-1) for p in params]).norm()
        if gnorm < tol * 10:
            break
    return model


def refit_without(
    model: nn.Module, x: Tensor, y: Tensor, drop: int, weight_decay: float, max_iter: int = 200
) -> nn.Module:
    """A copy of ``model`` refitted from its optimum without example ``drop``: minimises
    ``(1/n) * sum_{k != drop} L_k + (weight_decay / 2) * ||theta||^2`` with L-BFGS."""
    refit = copy.deepcopy(model)
    weights = torch.full((len(y),), 1.0 / len(y), dtype=x.dtype)
    weights[drop] = 0.0
    params = list(refit.parameters())
    opt = torch.optim.LBFGS(
        params, lr=1, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-16,
        history_size=50, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        losses = nn.functional.cross_entropy(refit(x), y, reduction="none")
        loss = (weights * losses).sum() + 0.5 * weight_decay * sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return refit
