"""``curvature="auto"``: the Hessian where ``H + damping I`` is positive definite, else
Gauss-Newton, checked against explicit eigenvalues and solves in float64 (``reference`` fixture)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import (
    ClassificationTask,
    Curvature,
    Exact,
    FunctionalModel,
    InfluenceConfig,
    LiSSA,
    as_indexed,
    compute_influence,
)
from lightning_influence.solvers.definiteness import smallest_eigenvalue

pytestmark = pytest.mark.usefixtures("float64")


def _toy(n: int = 60, d: int = 4, classes: int = 3) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(n, d, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    )


def _small_mlp(d: int = 4, hidden: int = 4, classes: int = 3) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double()


def _hessian(model: nn.Module, data: TensorDataset) -> Curvature:
    fm = FunctionalModel(model, ClassificationTask())
    return Curvature(fm, as_indexed(data, batch_size=16), "hessian")


def test_the_check_finds_the_smallest_eigenvalue_and_stops_once_it_is_below(reference) -> None:
    data, model = _toy(), _small_mlp()  # 35 parameters: 35 Lanczos steps span the space
    true = torch.linalg.eigvalsh(reference.hessian(model, *data.tensors))
    assert float(true[0]) < -1e-3  # a random network: negative curvature
    value, products = smallest_eigenvalue(_hessian(model, data))
    assert products <= len(true)  # fewer where the Krylov space closes (repeated eigenvalues)
    assert abs(value - float(true[0])) < 1e-8
    early, few = smallest_eigenvalue(_hessian(model, data), below=float(true[0]) / 2)
    assert few < len(true)
    assert float(true[0]) - 1e-10 <= early < float(true[0]) / 2  # a Ritz value: never below


def test_auto_takes_the_hessian_of_a_convex_model_at_its_optimum(reference, fit_lbfgs) -> None:
    data, damping = _toy(), 0.01
    x, y = data.tensors
    torch.manual_seed(3)
    model = fit_lbfgs(nn.Linear(4, 3).double(), x, y, damping)
    hessian = reference.hessian(model, x, y)
    result = compute_influence(
        model, data, data, solver=LiSSA(tol=1e-9), damping=damping, curvature="auto",
        progress=False,
    )  # fmt: skip
    assert result.settings["curvature"] == "auto"
    assert result.settings["curvature_used"] == "hessian"
    assert result.diagnostics["curvature_hessian"] == 1.0
    smallest = float(torch.linalg.eigvalsh(hessian)[0])
    assert abs(result.diagnostics["curvature_smallest_eigenvalue"] - smallest) < 1e-8
    g = reference.gradients(model, x, y)
    expected = -g @ torch.linalg.solve(hessian + damping * torch.eye(len(hessian)), g.T)
    torch.testing.assert_close(result.scores, expected, rtol=1e-6, atol=1e-8)


def test_auto_takes_the_hessian_where_the_damping_outweighs_negative_curvature(
    reference, fit_lbfgs
) -> None:
    data, damping = _toy(), 0.05
    x, y = data.tensors
    model = fit_lbfgs(_small_mlp(), x, y, damping)  # a non-convex model at its L2 optimum
    hessian = reference.hessian(model, x, y)
    true = torch.linalg.eigvalsh(hessian)
    assert -damping < float(true[0]) < 0
    result = compute_influence(
        model, data, data, solver=Exact(), damping=damping, curvature="auto", progress=False
    )
    assert result.settings["curvature_used"] == "hessian"
    assert abs(result.diagnostics["curvature_smallest_eigenvalue"] - float(true[0])) < 1e-8
    g = reference.gradients(model, x, y)
    expected = -g @ torch.linalg.solve(hessian + damping * torch.eye(len(hessian)), g.T)
    torch.testing.assert_close(result.scores, expected, rtol=1e-7, atol=1e-9)


def test_auto_takes_gauss_newton_where_the_hessian_is_indefinite(reference) -> None:
    data, model, damping = _toy(), _small_mlp(), 1e-3
    x, y = data.tensors
    true = torch.linalg.eigvalsh(reference.hessian(model, x, y))
    assert float(true[0]) < -damping  # H + damping I is indefinite
    auto, gauss_newton = (
        compute_influence(model, data, data, solver=Exact(), damping=damping, curvature=kind,
                          progress=False)
        for kind in ("auto", "gauss_newton")
    )  # fmt: skip
    assert auto.settings["curvature_used"] == "gauss_newton"
    assert auto.diagnostics["curvature_hessian"] == 0.0
    measured = auto.diagnostics["curvature_smallest_eigenvalue"]
    assert float(true[0]) - 1e-10 <= measured < -damping
    assert auto.diagnostics["curvature_check_products"] < len(true)  # stopped early
    torch.testing.assert_close(auto.scores, gauss_newton.scores, rtol=0, atol=0)
    assert "curvature_hessian" not in gauss_newton.diagnostics
    assert gauss_newton.settings["curvature_used"] == "gauss_newton"


def test_the_curvature_choice_is_checked() -> None:
    assert InfluenceConfig(curvature="auto").curvature == "auto"
    with pytest.raises(ValueError, match="'auto', 'gauss_newton', 'hessian'"):
        InfluenceConfig(curvature="fisher")  # type: ignore[arg-type]
