"""Layers that torch.func refuses: ``nn.LSTM`` on CPU and ``nn.EmbeddingBag`` (no forward-mode
derivative) and a classic ``autograd.Function`` (no ``setup_context``). Each product, gradient and
score is checked against a reference built by plain autograd in float64, never by the package;
layers that torch.func handles (GRU, LayerNorm, ...) keep the fast route."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset
from trainers import quick_trainer

from lightning_influence import Exact, InfluenceCallback, InfluenceError, compute_influence
from lightning_influence.core import products
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.products import (
    gauss_newton_products,
    hessian_available,
    hessian_products,
)
from lightning_influence.core.task import ClassificationTask

FALLBACK = "torch.func cannot handle this model"


class _Square(torch.autograd.Function):
    """``x^2`` written the classic way: ``forward(ctx, x)``, no ``setup_context``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.LSTM] | type[nn.GRU] = nn.LSTM) -> None:
        super().__init__()
        self.rnn, self.norm, self.head = (
            cell(3, 4, batch_first=True),
            nn.LayerNorm(4),
            nn.Linear(4, 3),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.gelu(self.norm(self.rnn(x)[0][:, -1])))


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(20, 4, mode="mean"), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bag(x)))


class _Classic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(_Square.apply(torch.tanh(self.a(x))))


class _Mixed(nn.Module):
    """Layers torch.func differentiates: convolution with max-pooling, BatchNorm, Dropout,
    multi-head attention, LayerNorm, SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4)
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.drop, self.layer_norm, self.head = nn.Dropout(0.1), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool1d(F.silu(self.norm(self.conv(x))), 2).transpose(1, 2)  # [n, 3, 4]
        h = self.layer_norm(h + self.attention(h, h, h, need_weights=False)[0])
        return self.head(self.drop(h.mean(1)))


def _case(name: str, n: int) -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    inputs: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
        "lstm": lambda: (_Recurrent(), torch.randn(n, 5, 3, generator=gen)),
        "gru": lambda: (_Recurrent(nn.GRU), torch.randn(n, 5, 3, generator=gen)),
        "mixed": lambda: (_Mixed(), torch.randn(n, 2, 6, generator=gen)),
        "embedding_bag": lambda: (_Bag(), torch.randint(0, 20, (n, 6), generator=gen)),
        "classic_function": lambda: (_Classic(), torch.randn(n, 4, generator=gen)),
    }
    model, x = inputs[name]()
    return model.eval(), TensorDataset(x, torch.randint(0, 3, (n,), generator=gen))


# ------------------------------------------------- references by plain autograd, in float64
def _functional(model: nn.Module) -> tuple[Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """A float64 copy's flat parameters and ``outputs(theta, x)``."""
    model = copy.deepcopy(model).double()
    named = list(model.named_parameters())
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def outputs(th: Tensor, x: Tensor) -> Tensor:
        pieces = torch.split(th, [p.numel() for _, p in named])
        params = {n: t.view(p.shape) for (n, p), t in zip(named, pieces, strict=True)}
        return functional_call(model, params, (x.double() if x.is_floating_point() else x,))

    return theta, outputs


def _reference(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example gradients ``[n, p]`` and the summed Gauss-Newton matrix ``[p, p]``, by plain
    autograd (``torch.autograd.functional``), in float64."""
    theta, outputs = _functional(model)
    grads, gauss_newton = [], torch.zeros(len(theta), len(theta), dtype=torch.float64)
    for i in range(len(y)):
        xi, yi = x[i : i + 1], y[i : i + 1]
        grads.append(
            torch.autograd.functional.jacobian(
                lambda th, xi=xi, yi=yi: F.cross_entropy(outputs(th, xi), yi), theta
            )
        )
        jac = torch.autograd.functional.jacobian(lambda th, xi=xi: outputs(th, xi)[0], theta)
        q = torch.softmax(outputs(theta, xi)[0], -1).detach()
        gauss_newton += jac.T @ (torch.diag(q) - torch.outer(q, q)) @ jac
    return torch.stack(grads), gauss_newton


def _hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The Hessian of the summed loss ``[p, p]``, by plain autograd, in float64."""
    theta, outputs = _functional(model)
    return torch.autograd.functional.hessian(
        lambda th: F.cross_entropy(outputs(th, x), y, reduction="sum"), theta
    )


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-4) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=rtol * scale)


# --------------------------------------------------------------------------- products
@pytest.mark.parametrize(
    ("name", "route"),
    [
        ("lstm", "double_backward"),
        ("embedding_bag", "reverse_passes"),
        ("classic_function", "double_backward"),
    ],
)
def test_curvature_products_fall_back_to_autograd_and_match_explicit_matrices(
    name: str, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(products, "_JACOBIAN_CHUNK_BYTES", 1)  # Jacobians one example at a time
    model, data = _case(name, 12)
    x, y = data.tensors
    _, gauss_newton = _reference(model, x, y)
    fm = FunctionalModel(model, ClassificationTask())
    eye = torch.eye(fm.n_params)
    with pytest.warns(UserWarning, match=FALLBACK):
        out = fm.outputs(fm.theta, x).detach()
        gn = gauss_newton_products(fm, x, y, out, eye)
    _close(gn, gauss_newton)
    assert fm.routes.diagnostics == {f"fallback_curvature_products_{route}": 1.0}
    if name == "embedding_bag":  # its backward has no derivative: no Hessian, a clear error
        with pytest.raises(InfluenceError, match="curvature='gauss_newton'"):
            hessian_products(fm, x, y, eye)
        assert not hessian_available(fm, x, y)
    else:
        _close(hessian_products(fm, x, y, eye), _hessian(model, x, y))
        assert hessian_available(fm, x, y)


def test_automatic_curvature_takes_gauss_newton_where_there_is_no_hessian() -> None:
    model, data = _case("embedding_bag", 40)
    train, val = TensorDataset(*data[:30]), TensorDataset(*data[30:])
    options: dict[str, Any] = {"solver": Exact(), "damping": 0.1, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = compute_influence(model, train, val, curvature="auto", **options)
        gauss_newton = compute_influence(model, train, val, curvature="gauss_newton", **options)
    assert auto.diagnostics["curvature_hessian"] == 0.0
    torch.testing.assert_close(auto.scores, gauss_newton.scores)


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", ["lstm", "embedding_bag", "classic_function", "gru", "mixed"])
def test_scores_and_self_influence_match_an_explicit_solve(name: str) -> None:
    model, data = _case(name, 40)
    train, val = TensorDataset(*data[:30]), TensorDataset(*data[30:])
    damping = 0.1
    train_grads, gauss_newton = _reference(model, *train.tensors)
    val_grads, _ = _reference(model, *val.tensors)
    system = gauss_newton / 30 + damping * torch.eye(len(gauss_newton))  # mean curvature
    expected_scores = -train_grads @ torch.linalg.solve(system, val_grads.T)
    expected_self = (train_grads * torch.linalg.solve(system, train_grads.T).T).sum(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compute_influence(
            model, train, val, solver=Exact(), damping=damping, progress=False
        )
    ours = [str(w.message) for w in caught if FALLBACK in str(w.message)]
    fallbacks = {k for k in result.diagnostics if k.startswith("fallback_")}
    if name == "mixed":  # torch.func differentiates every layer: the fast route, no warning
        assert not ours and not fallbacks
    elif name == "gru":  # vmap cannot batch its per-sample backward (as before); products can
        assert fallbacks == {"fallback_per_sample_gradients_loop"}
    else:
        assert fallbacks and ours and len(ours) == len(set(ours))  # each switch said once
    _close(result.scores, expected_scores, 1e-3)
    assert result.self_influence is not None
    _close(result.self_influence, expected_self, 1e-3)


@pytest.mark.parametrize("name", ["lstm", "embedding_bag", "classic_function"])
def test_the_callback_with_defaults_saves_a_result(name: str, tmp_path: Path) -> None:
    """200 examples, every default (LiSSA, self-influence, perturbation maps where inputs are
    floating point): a result in memory and on disk, the routes in its diagnostics."""
    model, data = _case(name, 200)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = InfluenceCallback(num_val=8, val_dataset=TensorDataset(*data[150:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quick_trainer(tmp_path, [callback]).fit(
            Module(), DataLoader(TensorDataset(*data[:150]), batch_size=32)
        )
    result = callback.result
    assert result is not None and callback.result_path is not None
    assert callback.result_path.exists()
    assert any(k.startswith("fallback_") for k in result.diagnostics)
    assert bool(torch.isfinite(result.scores).all())
    assert result.self_influence is not None and bool((result.self_influence > 0).all())


@pytest.mark.parametrize("name", ["lstm", "embedding_bag", "classic_function", "gru", "mixed"])
def test_defaults_agree_with_exact_on_200_examples(name: str) -> None:
    """``compute_influence`` with every default (LiSSA, self-influence) against ``Exact()``."""
    model, data = _case(name, 200)
    train, val = TensorDataset(*data[:150]), TensorDataset(*data[150:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        defaults = compute_influence(model, train, val, progress=False)
        exact = compute_influence(model, train, val, solver=Exact(), progress=False)
    pearson = torch.corrcoef(torch.stack([defaults.scores.flatten(), exact.scores.flatten()]))
    assert float(pearson[0, 1]) > 0.9999
    assert defaults.self_influence is not None and exact.self_influence is not None
    _close(defaults.self_influence, exact.self_influence.double(), 1e-3)
