"""Relative influence (RelatIF, loss-relative): scores over sqrt(self-influence), its rankings,
its file round trip, and the rankings from the default self-influence against exact ones."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import InfluenceResult
from lightning_influence.errors import InfluenceError
from lightning_influence.result import SELF_INFLUENCE_FLOOR


def small_result(self_influence: torch.Tensor | None) -> InfluenceResult:
    torch.manual_seed(0)
    return InfluenceResult(
        scores=torch.randn(6, 3, dtype=torch.float64),
        train_indices=torch.tensor([10, 11, 12, 13, 14, 15]),
        val_indices=torch.tensor([3, 4, 5]),
        self_influence=self_influence,
    )


def test_relative_rankings_divide_by_the_square_root_of_self_influence(tmp_path: Path) -> None:
    si = torch.tensor([4.0, 0.25, 1.0, 9.0, 2.0, 0.5], dtype=torch.float64)
    result = small_result(si)
    expected = result.scores / si.sqrt()[:, None]
    torch.testing.assert_close(result.relative_scores, expected)
    for name, largest in (("helpful", False), ("harmful", True)):
        ranking = getattr(result, name)(3, relative=True)
        values, pos = torch.topk(expected.T, 3, dim=1, largest=largest)
        assert torch.equal(ranking.indices, result.train_indices[pos])
        torch.testing.assert_close(ranking.scores, values)
        one = getattr(result, name)(3, val_index=4, relative=True)
        assert torch.equal(one.indices, ranking.indices[1:2])
        raw = getattr(result, name)(3)  # the raw ranking is unchanged
        assert torch.equal(raw.scores, torch.topk(result.scores.T, 3, largest=largest).values)
    # The saved file holds scores and self-influence: relative scores come back equal.
    loaded = InfluenceResult.load(result.save(tmp_path / "r.pt"))
    assert torch.equal(loaded.relative_scores, result.relative_scores)


def test_zero_and_negative_self_influence_are_floored() -> None:
    si = torch.tensor([4.0, 0.0, -1.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    relative = small_result(si).relative_scores
    assert torch.isfinite(relative).all()
    floor = (SELF_INFLUENCE_FLOOR * 4.0) ** 0.5
    torch.testing.assert_close(relative[1:3], small_result(si).scores[1:3] / floor)


def test_relative_without_self_influence_says_what_to_do() -> None:
    result = small_result(None)
    assert result.helpful(2).indices.shape == (3, 2)
    with pytest.raises(InfluenceError, match="self_influence=True"):
        result.helpful(2, relative=True)
    with pytest.raises(InfluenceError, match="self-influence"):
        result.harmful(2, relative=True)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean share of the training examples two rankings ``[n_val, k]`` both name."""
    shared = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b, strict=True)]
    return sum(shared) / a.numel()


@pytest.mark.slow  # the MLP fitted to its optimum, then an exact solve: about 8 s
def test_default_relative_rankings_match_exact_self_influence_on_the_mlp(
    digits, digits_models, fit_lbfgs
) -> None:
    from lightning_influence import Exact, compute_influence

    train, val = digits()
    model = fit_lbfgs(digits_models["mlp"](), *train.tensors, 0.01)
    options = {"damping": 0.01, "val_indices": range(64), "batch_size": 256, "progress": False}
    exact = compute_influence(model, train, val, solver=Exact(), **options)
    assert exact.settings["self_influence_solver"]["name"] == "exact"  # the solver's own inverse
    for solver in ("lissa", "cg"):  # CG takes LiSSA's preconditioner for self-influence too
        ours = compute_influence(model, train, val, solver=solver, dtype=torch.float32, **options)
        assert ours.settings["self_influence_solver"]["max_examples"] == 1024
        for name in ("helpful", "harmful"):
            reference = getattr(exact, name)(8, relative=True).indices
            overlap = _overlap(getattr(ours, name)(8, relative=True).indices, reference)
            raw = _overlap(getattr(exact, name)(8).indices, reference)
            print(f"{solver} {name}: relative top-8 overlap {overlap:.3f} (raw: {raw:.3f})")
            assert overlap >= 0.9
            assert raw < 0.5  # relative rankings differ from the raw ones: the test can tell


def test_relative_explanations_are_specific_to_each_validation_point(digits) -> None:
    """The README job's targets in a cheaper setting (an MLP fitted in 200 full-batch Adam
    steps, 10% flipped labels, 32 validation digits): relative lists carry the validation
    label and are not the same high-self-influence examples every time; the raw ones fail."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from digits import flip_labels  # examples/digits.py
    from explanations import explanation_metrics  # benchmarks/explanations.py

    from lightning_influence import compute_influence

    train, val = digits(dtype=torch.float32)
    x, y = train.tensors
    noisy, flipped = flip_labels(y, 0.1, "random", seed=0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), noisy).backward()
        opt.step()
    result = compute_influence(
        model, TensorDataset(x, noisy), val, damping=1e-2, val_indices=range(32), progress=False
    )
    raw = explanation_metrics(result, 8, relative=False, flipped=flipped)
    relative = explanation_metrics(result, 8, relative=True, flipped=flipped)
    print(f"raw {raw}\nrelative {relative}")
    assert relative["label"] >= 0.95 and raw["label"] < 0.9
    assert relative["top SI helpful"] <= 0.1 and raw["top SI helpful"] > 0.3
    assert relative["distinct"] >= 0.7 and relative["distinct"] > raw["distinct"] + 0.1
