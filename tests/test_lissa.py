"""Preconditioned LiSSA against an explicit float64 inverse built without the package."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from lightning_influence import Curvature, Exact, LiSSA, LowRank, compute_influence
from lightning_influence.core.data import as_indexed
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.task import ClassificationTask


def _small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("damping", [1e-3, 1e-4])
def test_preconditioned_matches_the_explicit_inverse_where_plain_needs_thousands(
    damping: float, digits: Callable[..., tuple], reference: type
) -> None:
    train, _ = digits(n_train=400)
    x, y = train.tensors
    model = _small_mlp()
    matrix = reference.gauss_newton(model, x)
    evals = torch.linalg.eigvalsh(matrix)
    plain_steps = 3 * float(evals.max() + damping) / damping  # what the plain series would need
    assert plain_steps > 1_000
    v = reference.gradients(model, x[:6], y[:6])
    expected = v @ reference.inverse(matrix, damping)
    curvature = Curvature(FunctionalModel(model, ClassificationTask()), as_indexed(train))
    solved, info = LiSSA(tol=1e-4).solve(curvature, v, damping)
    assert _rel(solved, expected) < 1e-2
    assert info["steps"] < plain_steps / 4
    assert info["relative_residual"] <= 1e-4


def test_plain_lissa_is_still_available(digits: Callable[..., tuple], reference: type) -> None:
    train, _ = digits(n_train=300)
    x, y = train.tensors
    model = _small_mlp()
    damping = 0.1
    matrix = reference.gauss_newton(model, x)
    v = reference.gradients(model, x[:3], y[:3])
    curvature = Curvature(FunctionalModel(model, ClassificationTask()), as_indexed(train))
    solved, info = LiSSA(preconditioner=None, batch_size=300).solve(curvature, v, damping)
    assert _rel(solved, v @ reference.inverse(matrix, damping)) < 2e-2
    assert "preconditioned_condition_number" not in info


@pytest.mark.slow
def test_hessian_mode_matches_exact_at_an_optimum(
    digits: Callable[..., tuple], fit_lbfgs: Callable[..., nn.Module], reference: type
) -> None:
    train, val = digits(n_train=300)
    x, y = train.tensors
    model = fit_lbfgs(_small_mlp(), x, y, 0.01)
    damping = 0.01
    matrix = reference.hessian(model, x, y)
    v = reference.gradients(model, *val[:5])
    curvature = Curvature(
        FunctionalModel(model, ClassificationTask()), as_indexed(train), "hessian"
    )
    solved, info = LiSSA(tol=1e-4).solve(curvature, v, damping)
    assert _rel(solved, v @ reference.inverse(matrix, damping)) < 1e-2
    assert info["preconditioner_most_negative_eigenvalue"] <= 0


def test_indefinite_hessian_raises_and_suggests_a_damping(digits: Callable[..., tuple]) -> None:
    train, _ = digits(n_train=200)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()  # untrained
    curvature = Curvature(
        FunctionalModel(model, ClassificationTask()), as_indexed(train), "hessian"
    )
    full_rank = LowRank(rank=curvature.n_params, method="lanczos")
    with pytest.raises(ValueError, match=r"not positive definite.*Pass `damping="):
        LiSSA(preconditioner=full_rank).solve(curvature, torch.randn(2, curvature.n_params), 1e-6)


@dataclass(frozen=True)
class _CountingLowRank(LowRank):
    calls: ClassVar[list[int]] = []

    def factorize(self, curvature, damping, progress=False):  # type: ignore[no-untyped-def]
        self.calls.append(1)
        return super().factorize(curvature, damping, progress)


def test_one_factorization_serves_lissa_and_self_influence(digits: Callable[..., tuple]) -> None:
    train, val = digits(n_train=300)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()  # > 512
    _CountingLowRank.calls.clear()
    result = compute_influence(
        model, train, val, solver=LiSSA(preconditioner=_CountingLowRank()), damping=1e-2,
        val_indices=range(4), progress=False,
    )  # fmt: skip
    assert len(_CountingLowRank.calls) == 1
    d = result.diagnostics
    assert d["self_influence_matvecs"] == d["solver_preconditioner_matvecs"] > 0
    exact = compute_influence(
        model, train, val, solver=Exact(), damping=1e-2, val_indices=range(4), progress=False
    )
    assert _rel(result.scores, exact.scores) < 1e-2
    assert torch.corrcoef(torch.stack([result.self_influence, exact.self_influence]))[0, 1] > 0.99
