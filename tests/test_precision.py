"""Scoring in bfloat16 / float16 (``scoring_dtype``) against the float32 scoring pass."""

from __future__ import annotations

import warnings

import pytest
import torch
from scipy.stats import spearmanr
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_influence import (
    ClassificationTask,
    Exact,
    FunctionalModel,
    InfluenceConfig,
    LowRank,
    RegressionTask,
    as_indexed,
    compute_influence,
)
from lightning_influence.core.scores import example_pass
from lightning_influence.core.task import Task
from lightning_influence.solvers.exact import DenseInverse
from lightning_influence.solvers.lowrank import LowRankInverse

N = 96


class _Tokens(nn.Module):
    """An embedding with a padding row, averaged over positions, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8, padding_idx=0)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(x)).mean(dim=1))


def _models() -> dict[str, tuple[nn.Module, Tensor, Tensor, Task]]:
    torch.manual_seed(0)
    x, y = torch.randn(N, 10), torch.randint(0, 3, (N,))
    conv = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    return {
        "mlp": (nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)), x, y, None),
        "mixed": (  # the LayerNorm takes the per-sample route in the same pass
            nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3)),
            x,
            y,
            None,
        ),
        "conv2d": (conv, torch.randn(N, 1, 6, 6), y, None),
        "embedding": (_Tokens(), torch.randint(0, 12, (N, 5)), y, None),
        "regression": (
            nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2)),
            x,
            torch.randn(N, 2),
            RegressionTask(),
        ),
    }  # type: ignore[return-value]


MODELS = _models()


def _low_rank(p: int, rank: int) -> LowRankInverse:
    gen = torch.Generator().manual_seed(1)
    evecs = torch.linalg.qr(torch.randn(p, rank, generator=gen))[0].T.contiguous()
    return LowRankInverse(evecs, torch.linspace(5.0, 0.5, rank), 0.1)


def _rho(a: Tensor, b: Tensor) -> float:
    return float(spearmanr(a.ravel().numpy(), b.ravel().numpy())[0])


def _relative(ref: Tensor, est: Tensor) -> float:
    return float((est - ref).abs().max() / ref.abs().max())


# bfloat16 keeps 8 bits of mantissa, float16 11: measured 5e-3 and 7e-4 at most on these models
BOUNDS = {torch.bfloat16: 0.015, torch.float16: 0.002}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_lowered_scores_and_self_influence_follow_float32(name: str, dtype: torch.dtype) -> None:
    model, x, y, task = MODELS[name]
    fm = FunctionalModel(model, task or ClassificationTask())
    gen = torch.Generator().manual_seed(2)
    val_inverse = torch.randn(4, fm.n_params, generator=gen)
    inverse = _low_rank(fm.n_params, rank=6)
    data = as_indexed(TensorDataset(x, y), batch_size=32)
    ref = example_pass(fm, data, val_inverse, inverse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the layer-wise route is kept: its check runs in float32
        low = example_pass(fm, data, val_inverse, inverse, scoring_dtype=dtype)
    assert ref.scores is not None and low.scores is not None
    assert ref.self_influence is not None and low.self_influence is not None
    for t in (low.scores, low.self_influence, low.losses):
        assert t.dtype == torch.float32
    assert not torch.equal(low.scores, ref.scores)  # the pass really ran in lower precision
    assert _rho(ref.scores, low.scores) >= 0.999
    assert _rho(ref.self_influence, low.self_influence) >= 0.999
    assert _relative(ref.scores, low.scores) <= BOUNDS[dtype]
    assert _relative(ref.self_influence, low.self_influence) <= BOUNDS[dtype]
    torch.testing.assert_close(low.losses, ref.losses, rtol=BOUNDS[dtype], atol=1e-3)


def test_per_sample_route_keeps_float32_and_says_so() -> None:
    """A dense inverse takes the per-sample route, which scoring_dtype leaves in float32."""
    model, x, y, _ = MODELS["mixed"]
    fm = FunctionalModel(model, ClassificationTask())
    gen = torch.Generator().manual_seed(3)
    val_inverse = torch.randn(4, fm.n_params, generator=gen)
    a = torch.randn(fm.n_params, fm.n_params, generator=gen)
    evals, evecs = torch.linalg.eigh(a @ a.T / fm.n_params)
    inverse = DenseInverse(evecs, 1.0 / (evals + 0.1))
    data = as_indexed(TensorDataset(x, y), batch_size=32)
    ref = example_pass(fm, data, val_inverse, inverse)
    with pytest.warns(UserWarning, match=r"`scoring_dtype='bfloat16'` has no effect on this pass"):
        low = example_pass(fm, data, val_inverse, inverse, scoring_dtype=torch.bfloat16)
    assert ref.scores is not None and low.scores is not None
    assert torch.equal(low.scores, ref.scores)
    assert torch.equal(low.self_influence, ref.self_influence)


def test_compute_influence_in_bfloat16_matches_float32_and_records_it() -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    train, val = TensorDataset(x[:160], y[:160]), TensorDataset(x[160:], y[160:])
    options = dict(solver=Exact(), damping=0.1, self_influence_solver=LowRank(rank=16))
    ref = compute_influence(model, train, val, progress=False, **options)
    low = compute_influence(model, train, val, progress=False, scoring_dtype="bfloat16", **options)
    assert low.scores.dtype == low.self_influence.dtype == torch.float32
    assert low.settings["scoring_dtype"] == "bfloat16" and ref.settings["scoring_dtype"] is None
    assert not torch.equal(low.scores, ref.scores)
    assert _rho(ref.scores, low.scores) >= 0.99
    assert _rho(ref.self_influence, low.self_influence) >= 0.99
    assert _relative(ref.scores, low.scores) <= 0.03
    assert _relative(ref.self_influence, low.self_influence) <= 0.03
    torch.testing.assert_close(low.val_losses, ref.val_losses)  # validation stays float32
    same = low.train_predictions == ref.train_predictions
    assert same.float().mean() >= 0.97  # a few near-ties may flip


def test_scoring_dtype_is_checked_and_stored_by_name() -> None:
    assert InfluenceConfig(scoring_dtype=torch.bfloat16).scoring_dtype == "bfloat16"  # type: ignore[arg-type]
    config = InfluenceConfig(scoring_dtype="float16")
    assert config.scoring_torch_dtype == torch.float16
    assert config.to_dict()["scoring_dtype"] == "float16"
    assert InfluenceConfig().scoring_torch_dtype is None
    with pytest.raises(ValueError, match=r"`scoring_dtype` must be None, 'bfloat16' or 'float16'"):
        InfluenceConfig(scoring_dtype="float32")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got torch.float64\. None \(the default\)"):
        InfluenceConfig(scoring_dtype=torch.float64)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`scoring_dtype='bfloat16'`.*dtype='float64'"):
        InfluenceConfig(scoring_dtype="bfloat16", dtype="float64")


def test_a_float64_model_is_refused_before_any_work() -> None:
    model = nn.Linear(3, 2).double()
    data = TensorDataset(torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))
    with pytest.raises(ValueError, match=r"`scoring_dtype='float16'`.*torch\.float64"):
        compute_influence(model, data, data, solver=Exact(), scoring_dtype="float16")
    fm = FunctionalModel(model, ClassificationTask())
    with pytest.raises(ValueError, match=r"`scoring_dtype` must be one of"):
        example_pass(fm, as_indexed(data), torch.zeros(1, 8), scoring_dtype=torch.int8)


def test_float16_takes_solved_vectors_beyond_its_range() -> None:
    """Solved vectors scale as 1 / damping: entries of 1e6 overflow float16 unless scaled."""
    model, x, y, _ = MODELS["conv2d"]
    fm = FunctionalModel(model, ClassificationTask())
    gen = torch.Generator().manual_seed(4)
    val_inverse = torch.randn(4, fm.n_params, generator=gen) * 1e6
    val_inverse[:, : fm.numels[0]] *= 1e-6  # the first layer's share far below the others'
    data = as_indexed(TensorDataset(x, y), batch_size=32)
    ref = example_pass(fm, data, val_inverse)
    low = example_pass(fm, data, val_inverse, scoring_dtype=torch.float16)
    assert ref.scores is not None and low.scores is not None
    assert torch.isfinite(low.scores).all()
    assert _relative(ref.scores, low.scores) <= BOUNDS[torch.float16]
