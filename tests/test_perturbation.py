"""Perturbation maps (``I_pert,loss``), computed for all pairs at once, against a loop over
validation points of double-backward passes in float64."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from lightning_influence import ClassificationTask, FunctionalModel, as_indexed
from lightning_influence.compute import _perturbations
from lightning_influence.core import scores as scores_module
from lightning_influence.core.scores import (
    pairs_per_chunk,
    perturbation_influence,
    perturbation_pairs,
)

pytestmark = pytest.mark.usefixtures("float64")


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.max_pool2d(torch.tanh(self.bn(self.conv(x))), 2)
        return self.head(h.flatten(1))


def _case(kind: str, n: int = 10) -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(3)
    if kind == "mlp":
        model: nn.Module = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    else:
        model = _SmallCNN()
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        x, y = torch.randn(n, 1, 6, 6), torch.randint(0, 4, (n,))
    return model.double().eval(), TensorDataset(x, y)


def _double_backward(model: nn.Module, x: Tensor, y: Tensor, s: Tensor) -> Tensor:
    """``-s^T grad_x grad_theta L(x, y)`` for one example, with plain autograd."""
    params = list(model.parameters())
    xi = x.unsqueeze(0).clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(xi), y.unsqueeze(0))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    (dx,) = torch.autograd.grad(-(flat * s).sum(), xi)
    return dx[0]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one-chunk", "chunks-of-a-batch"])
def test_maps_equal_a_loop_over_validation_points(
    kind: str, chunk_bytes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunk_bytes is not None:  # chunks of `batch_size` pairs: examples split across chunks
        monkeypatch.setattr(scores_module, "PAIR_CHUNK_BYTES", chunk_bytes)
    model, data = _case(kind)
    fm = FunctionalModel(model, ClassificationTask())
    train = as_indexed(data, torch.tensor([9, 2, 7, 4, 0, 5, 1]), batch_size=3)
    gen = torch.Generator().manual_seed(4)
    n_val, k = 5, 2
    scores = torch.randn(len(train), n_val, generator=gen)  # rows: the training rows above
    val_inverse = torch.randn(n_val, fm.n_params, generator=gen)

    maps, indices = _perturbations(fm, train, train.indices, scores, val_inverse, k)

    x, y = data.tensors
    assert maps.shape == (n_val, 2 * k, *x.shape[1:])
    for j in range(n_val):
        order = torch.argsort(scores[:, j])
        assert (
            indices[j].tolist()
            == train.indices[torch.cat([order[:k], order[-k:].flip(0)])].tolist()
        )
        for q, i in enumerate(indices[j].tolist()):
            expected = _double_backward(model, x[i], y[i], val_inverse[j])
            torch.testing.assert_close(maps[j, q], expected, rtol=1e-9, atol=1e-12)
    assert len(set(indices.reshape(-1).tolist())) < indices.numel()  # examples shared by points


class _Counting(Dataset[Any]):
    """A map-style dataset that counts how often each example is read."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data
        self.reads: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        self.reads[i] = self.reads.get(i, 0) + 1
        return self.data[i]


def test_each_chosen_example_is_read_once_besides_one_probe() -> None:
    model, data = _case("mlp", n=12)
    fm = FunctionalModel(model, ClassificationTask())
    counting = _Counting(data)
    train = as_indexed(counting, batch_size=4)
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(len(train), 6, generator=gen)
    _, indices = _perturbations(fm, train, train.indices, scores, torch.randn(6, fm.n_params), 3)
    chosen = set(indices.reshape(-1).tolist())
    assert set(counting.reads) == chosen
    assert sum(counting.reads.values()) == len(chosen) + 1  # one example read first for its size


def test_pairs_and_all_combinations_agree() -> None:
    model, data = _case("cnn", n=4)
    fm = FunctionalModel(model, ClassificationTask())
    s = torch.randn(3, fm.n_params, generator=torch.Generator().manual_seed(6))
    every = perturbation_influence(fm, data[:], s)  # [4, 3, 1, 6, 6]
    examples, vectors = torch.tensor([3, 0, 3, 1]), torch.tensor([2, 2, 0, 1])
    pairs = perturbation_pairs(fm, data[:], s, examples, vectors, chunk_size=3)
    assert every.shape == (4, 3, 1, 6, 6) and pairs.shape == (4, 1, 6, 6)
    torch.testing.assert_close(pairs, every[examples, vectors], rtol=1e-12, atol=1e-14)


def test_integer_inputs_are_refused_with_a_type_error() -> None:
    fm = FunctionalModel(nn.Linear(5, 3).double(), ClassificationTask())
    batch = (torch.randint(0, 4, (2, 5)), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="floating-point tensor inputs"):
        perturbation_influence(fm, batch, torch.randn(1, fm.n_params))
    with pytest.raises(TypeError, match="floating-point tensor inputs"):
        perturbation_pairs(
            fm, batch, torch.randn(1, fm.n_params), torch.tensor([0]), torch.tensor([0])
        )


def test_pairs_per_chunk_fits_the_budget_and_honours_the_task() -> None:
    fm = FunctionalModel(nn.Linear(5, 3).double(), ClassificationTask())  # 18 parameters
    budget = scores_module.PAIR_CHUNK_BYTES // (8 * (18 + 5))
    assert pairs_per_chunk(fm, 5) == budget
    assert pairs_per_chunk(fm, 5, at_least=budget + 7) == budget + 7

    class Limited(ClassificationTask):
        chunk_size = 4

    limited = FunctionalModel(nn.Linear(5, 3).double(), Limited())
    assert pairs_per_chunk(limited, 5, at_least=64) == 4
