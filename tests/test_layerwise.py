"""Layer-wise scores equal scores from per-sample gradients, without forming ``[batch, p]``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_influence import ClassificationTask, FunctionalModel, RegressionTask, as_indexed
from lightning_influence.core.gradients import PerSampleGradients
from lightning_influence.core.layerwise import LayerwiseDots, layerwise_parameters
from lightning_influence.core.scores import example_pass, quadratic_form
from lightning_influence.core.task import Task
from lightning_influence.solvers.lowrank import LowRankInverse


class _Sequence(nn.Module):
    """Linear layers over ``[batch, 2, 3, features]`` inputs, pooled to a class score."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 6)
        self.mix = nn.Linear(6, 4, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.mix(torch.tanh(self.embed(x))).mean(dim=(1, 2)))


class _Tokens(nn.Module):
    """An embedding with a padding row, averaged over positions, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(x)).mean(dim=1))


class _SharedWeight(nn.Module):
    """Uses one layer's weight outside its forward: hooks cannot see that use."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        return self.out(h @ self.lin.weight)


class _ChunkedTask(ClassificationTask):
    """Differentiates three examples at a time (as ``LanguageModelingTask(chunk_size=3)``)."""

    chunk_size = 3


def _models() -> dict[str, tuple[nn.Module, Tensor, Tensor, Task]]:
    torch.manual_seed(0)
    x = torch.randn(11, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (11,))
    mlp = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3))
    mixed = nn.Sequential(nn.Linear(7, 9), nn.LayerNorm(9), nn.Tanh(), nn.Linear(9, 3))
    regression = nn.Sequential(nn.Linear(7, 12), nn.ReLU(), nn.Linear(12, 2))
    seq_x = torch.randn(11, 2, 3, 5, dtype=torch.float64)
    conv = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 2, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    images = torch.randn(11, 2, 7, 7, dtype=torch.float64)
    tokens = torch.randint(0, 6, (11, 5))  # repeats and padding (0) in most rows
    return {
        "mlp": (mlp.double(), x, y, ClassificationTask()),
        "mixed": (mixed.double(), x, y, ClassificationTask()),
        "leading_dims": (_Sequence().double(), seq_x, y, ClassificationTask()),
        "chunked": (_Sequence().double(), seq_x, y, _ChunkedTask()),
        "conv2d": (conv.double(), images, y, ClassificationTask()),
        "embedding": (_Tokens().double(), tokens, y, ClassificationTask()),
        "regression": (
            regression.double(),
            x,
            torch.randn(11, 2, dtype=torch.float64),
            RegressionTask(),
        ),
    }


MODELS = _models()


def _reference_gradients(fm: FunctionalModel, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample gradients from a loop of batch-size-1 backward passes."""
    rows = []
    for i in range(x.shape[0]):
        theta = fm.theta.detach().requires_grad_(True)
        loss = fm.losses(theta, x[i : i + 1], y[i : i + 1]).sum()
        rows.append(torch.autograd.grad(loss, theta)[0])
    return torch.stack(rows)


def _low_rank(p: int, rank: int) -> LowRankInverse:
    gen = torch.Generator().manual_seed(1)
    evecs = torch.linalg.qr(torch.randn(p, rank, generator=gen, dtype=torch.float64))[0].T
    return LowRankInverse(evecs, torch.linspace(5.0, 0.5, rank, dtype=torch.float64), 0.1)


@pytest.mark.parametrize("name", list(MODELS))
def test_scores_and_self_influence_match_per_sample_gradients(name: str) -> None:
    model, x, y, task = MODELS[name]
    fm = FunctionalModel(model, task)
    g = _reference_gradients(fm, x, y)
    val_inverse = torch.randn(3, fm.n_params, dtype=torch.float64)
    inverse = _low_rank(fm.n_params, rank=4)
    data = as_indexed(TensorDataset(x, y), batch_size=4)

    sizes: list[int] = []

    class Counting(PerSampleGradients):
        def __call__(self, inputs: Any, targets: Any) -> Tensor:
            sizes.append(int(inputs.shape[0]))
            return super().__call__(inputs, targets)

    counting = Counting(fm)
    scored = example_pass(fm, data, val_inverse, inverse, gradients=counting)
    assert scored.scores is not None and scored.self_influence is not None
    torch.testing.assert_close(scored.scores, -(g @ val_inverse.T), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(
        scored.self_influence, quadratic_form(inverse, g), rtol=1e-9, atol=1e-10
    )
    losses = torch.stack([fm.losses(fm.theta, x[i : i + 1], y[i : i + 1])[0] for i in range(11)])
    torch.testing.assert_close(scored.losses, losses)
    # Full per-sample gradients only for the first batch's check; never for the rest.
    assert sizes == [4]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_parameter_but_the_layer_norms_is_covered(name: str) -> None:
    model, _, _, task = MODELS[name]
    fm = FunctionalModel(model, task)
    expected = [not n.startswith("1.") if name == "mixed" else True for n in fm.names]
    assert layerwise_parameters(fm) == expected


def test_mixed_model_takes_both_routes() -> None:
    model, x, y, task = MODELS["mixed"]
    fm = FunctionalModel(model, task)
    assert layerwise_parameters(fm) == [True, True, False, False, True, True]
    rows = torch.randn(2, fm.n_params, dtype=torch.float64)
    _, dots, norms = LayerwiseDots(fm, rows)(x, y)
    g = _reference_gradients(fm, x, y)
    torch.testing.assert_close(dots, g @ rows.T, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(norms, g.square().sum(dim=1), rtol=1e-9, atol=1e-10)


def test_chosen_subset_of_parameters() -> None:
    model, x, y, task = MODELS["leading_dims"]
    fm = FunctionalModel(model, task, parameters=["mix.weight", "head.bias"])
    rows = torch.randn(2, fm.n_params, dtype=torch.float64)
    _, dots, _ = LayerwiseDots(fm, rows)(x, y)
    torch.testing.assert_close(dots, _reference_gradients(fm, x, y) @ rows.T)


def test_weights_used_outside_forward_fall_back_with_a_warning() -> None:
    torch.manual_seed(0)
    model = _SharedWeight().double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    fm = FunctionalModel(model, ClassificationTask())
    val_inverse = torch.randn(2, fm.n_params, dtype=torch.float64)
    with pytest.warns(UserWarning, match="Layer-wise scores disagree"):
        scored = example_pass(fm, as_indexed(TensorDataset(x, y), batch_size=4), val_inverse)
    assert scored.scores is not None
    g = _reference_gradients(fm, x, y)
    torch.testing.assert_close(scored.scores, -(g @ val_inverse.T))


def test_float32_matches_float64_reference() -> None:
    model, x, y, task = MODELS["leading_dims"]
    fm64 = FunctionalModel(model, task)
    fm32 = FunctionalModel(model, task, dtype=torch.float32)
    rows = torch.randn(3, fm64.n_params, dtype=torch.float64)
    _, dots, _ = LayerwiseDots(fm32, rows)(x.float(), y)
    reference = _reference_gradients(fm64, x, y) @ rows.T
    torch.testing.assert_close(dots.double(), reference, rtol=1e-4, atol=1e-5)
