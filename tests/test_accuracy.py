"""Accuracy on scikit-learn's digits against exact references (float64), and leave-one-out."""

from __future__ import annotations

import agreement
import pytest
import torch
from torch import Tensor, nn

from lightning_influence import CG, Exact, InfluenceResult, LiSSA, compute_influence

pytestmark = pytest.mark.slow

WEIGHT_DECAY = 0.01
N_VAL = 24


def _top10_overlap(a: Tensor, b: Tensor) -> float:
    """Mean share of each validation point's 10 largest-|score| training examples found by both."""
    shared = [
        len(
            set(a[:, j].abs().topk(10).indices.tolist())
            & set(b[:, j].abs().topk(10).indices.tolist())
        )
        for j in range(a.shape[1])
    ]
    return sum(shared) / (10 * len(shared))


@pytest.fixture(scope="module")
def problem(digits, digits_models, fit_lbfgs) -> dict[str, object]:
    train, val = digits()
    models = {
        name: fit_lbfgs(build(), *train.tensors, WEIGHT_DECAY)
        for name, build in digits_models.items()
    }
    return {"train": train, "val": val, "models": models}


def _influence(problem: dict, name: str, solver, dtype: torch.dtype) -> InfluenceResult:
    return compute_influence(
        problem["models"][name],
        problem["train"],
        problem["val"],
        solver=solver,
        damping=WEIGHT_DECAY,
        val_indices=range(N_VAL),
        self_influence=False,
        batch_size=256,
        dtype=dtype,
        progress=False,
    )


@pytest.fixture(scope="module")
def exact(problem: dict) -> dict[str, InfluenceResult]:
    return {name: _influence(problem, name, Exact(), torch.float64) for name in ("logistic", "mlp")}


def test_lissa_defaults_match_exact_on_logistic_regression(problem, exact) -> None:
    lissa = _influence(problem, "logistic", LiSSA(), torch.float32)
    reference = exact["logistic"].scores
    pearson = agreement.pearson(lissa.scores, reference)
    overlap = _top10_overlap(lissa.scores, reference)
    print(f"logistic LiSSA vs Exact: pearson {pearson:.4f}, top-10 overlap {overlap:.3f}")
    assert pearson >= 0.99
    assert overlap >= 0.8


def test_cg_matches_exact_on_logistic_regression(problem, exact) -> None:
    cg = _influence(problem, "logistic", CG(), torch.float32)
    pearson = agreement.pearson(cg.scores, exact["logistic"].scores)
    print(f"logistic CG vs Exact: pearson {pearson:.6f}")
    assert pearson >= 0.999


def test_lissa_defaults_match_exact_on_the_mlp(problem, exact) -> None:
    lissa = _influence(problem, "mlp", LiSSA(), torch.float32)
    pearson = agreement.pearson(lissa.scores, exact["mlp"].scores)
    print(f"MLP LiSSA vs Exact: pearson {pearson:.4f}")
    assert pearson >= 0.95


def test_predicted_leave_one_out_matches_retraining(problem, exact, refit_without) -> None:
    model = problem["models"]["logistic"]
    x, y = problem["train"].tensors
    xv, yv = problem["val"].tensors
    result = exact["logistic"]
    j = int(result.val_losses.argmax())  # the worst-fit validation point: the largest effects
    column = result.scores[:, j]
    top = column.abs().topk(24).indices
    rest = torch.tensor([i for i in range(len(y)) if i not in set(top.tolist())])
    random = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(0))[:24]]
    chosen = torch.cat([top, random])

    def val_loss(m: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(m(xv[j : j + 1]), yv[j : j + 1]))

    base = val_loss(model)
    actual = torch.tensor(
        [val_loss(refit_without(model, x, y, int(i), WEIGHT_DECAY)) - base for i in chosen]
    )
    predicted = result.removal_effect[chosen, j]
    pearson = agreement.pearson(predicted, actual)
    print(f"leave-one-out, {len(chosen)} retrainings: pearson {pearson:.4f}")
    assert pearson >= 0.95
