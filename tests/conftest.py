"""Shared test set-up: reproducible, quiet runs, the digits reference models, and references
computed without the package (plain autograd in float64) for the estimates to be checked against.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py, tests/ddp_influence_run.py
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))  # examples/digits.py

import models  # tests/models.py, shared with the benchmarks

# One intra-op thread: on a 2-core machine timings and even results of reductions vary otherwise.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:  # pragma: no cover
        pass
    wandb_dir = tmp_path / "wandb"
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(wandb_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


@pytest.fixture
def float64() -> Iterator[None]:
    """Float64 as the default dtype for the test, float32 again afterwards."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


# ------------------------------------------------------------------ digits reference models
@pytest.fixture(scope="session")
def digits() -> Callable[..., tuple[torch.utils.data.TensorDataset, ...]]:
    """``digits(n_train=1200)``: standardised float64 digits, ``(train, val)``."""
    return models.digits


@pytest.fixture(scope="session")
def fit_lbfgs() -> Callable[..., nn.Module]:
    """``fit_lbfgs(model, x, y, weight_decay)``: the model at its L2-regularised optimum."""
    return models.fit_lbfgs


@pytest.fixture(scope="session")
def refit_without() -> Callable[..., nn.Module]:
    """``refit_without(model, x, y, drop, weight_decay)``: refitted without example ``drop``."""
    return models.refit_without


@pytest.fixture(scope="session")
def digits_models() -> dict[str, Callable[[], nn.Module]]:
    """Builders of the float64 digits models: ``"logistic"`` (650 parameters) and ``"mlp"``
    (64-32-10 tanh, 2,410 parameters)."""
    return {"logistic": models.logistic_regression, "mlp": models.mlp}


# ------------------------------------------------------------- references without the package
class Reference:
    """Gradients and curvature of ``mean_i cross_entropy(model(x_i), y_i)`` over all of
    ``model.parameters()`` (flattened in that order), by plain autograd: never the package."""

    @staticmethod
    def gradients(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Per-example gradients ``[n, p]`` from a loop of batch-size-1 backward passes."""
        rows = []
        for i in range(len(y)):
            model.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))  # type: ignore[union-attr]
        model.zero_grad()
        return torch.stack(rows)

    @staticmethod
    def _flat(model: nn.Module) -> tuple[Tensor, Callable[[Tensor, Tensor], Tensor]]:
        """The flat parameter vector and ``outputs(theta, x)``."""
        named = [(n, p) for n, p in model.named_parameters()]
        theta = torch.cat([p.detach().reshape(-1) for _, p in named])

        def outputs(th: Tensor, x: Tensor) -> Tensor:
            params, start = {}, 0
            for name, p in named:
                params[name] = th[start : start + p.numel()].reshape(p.shape)
                start += p.numel()
            return functional_call(model, params, (x,))

        return theta, outputs

    @staticmethod
    def hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The Hessian ``[p, p]`` of the mean loss, by ``torch.func.hessian``."""
        theta, outputs = Reference._flat(model)
        return torch.func.hessian(lambda th: nn.functional.cross_entropy(outputs(th, x), y))(theta)

    @staticmethod
    def gauss_newton(model: nn.Module, x: Tensor, directions: int | None = None) -> Tensor:
        """``(1/n) sum_i J_i^T H_i J_i`` ``[p, p]`` from dense Jacobians ``J_i`` of the logits and
        the softmax cross-entropy Hessians ``H_i = diag(q_i) - q_i q_i^T``; with ``directions``,
        only the top ``directions`` eigenpairs of each ``H_i`` are kept."""
        theta, outputs = Reference._flat(model)
        jac = torch.func.jacrev(lambda th: outputs(th, x))(theta)  # [n, k, p]
        q = torch.softmax(outputs(theta, x), -1).detach()
        h_out = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]
        if directions is not None:
            evals, evecs = torch.linalg.eigh(h_out)
            top = evecs[:, :, -directions:] * evals[:, None, -directions:].clamp_min(0).sqrt()
            h_out = top @ top.transpose(1, 2)
        return torch.einsum("nkp,nkl,nlq->pq", jac, h_out, jac) / len(x)

    @staticmethod
    def logistic_gradients(model: nn.Linear, x: Tensor, y: Tensor) -> Tensor:
        """Closed form for logits ``W x + b``: ``g_i = (q_i - e_{y_i}) [x_i; 1]^T``, flattened as
        ``(W row-major, b)``."""
        residual = torch.softmax(model(x), -1).detach()
        residual[torch.arange(len(y)), y] -= 1
        weight = residual[:, :, None] * x[:, None, :]
        return torch.cat([weight.flatten(1), residual], 1)

    @staticmethod
    def logistic_hessian(model: nn.Linear, x: Tensor) -> Tensor:
        """Closed form for logits ``W x + b``: ``(1/n) sum_i H_i (x) [x_i; 1] [x_i; 1]^T``, in the
        order ``(W row-major, b)``; it equals the Gauss-Newton matrix."""
        q = torch.softmax(model(x), -1).detach()
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        s = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]  # [n, c, c]
        h = torch.einsum("nab,ni,nj->aibj", s, xa, xa) / len(x)  # [c, d+1, c, d+1]
        c, d = h.shape[0], h.shape[1] - 1
        weight = h[:, :d, :, :d].reshape(c * d, c * d)
        cross = h[:, :d, :, d].reshape(c * d, c)
        bias = h[:, d, :, d]
        return torch.cat([torch.cat([weight, cross], 1), torch.cat([cross.T, bias], 1)], 0)

    @staticmethod
    def inverse(matrix: Tensor, damping: float) -> Tensor:
        """``(matrix + damping I)^-1`` by ``torch.linalg.solve``."""
        eye = torch.eye(len(matrix), dtype=matrix.dtype)
        return torch.linalg.solve(matrix + damping * eye, eye)


@pytest.fixture(scope="session")
def reference() -> type[Reference]:
    """References computed without the package; see :class:`Reference`."""
    return Reference
