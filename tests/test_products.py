"""Forward-mode curvature products one vector per pass or vmapped together, and the forward pass
shared with the reverse-mode graph: the same numbers as dense references, in float64."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_influence import ClassificationTask, Curvature, FunctionalModel, as_indexed
from lightning_influence.core.passes import VectorPasses
from lightning_influence.core.products import (
    gauss_newton_products,
    hessian_products,
    outputs_and_pullback,
)

pytestmark = pytest.mark.usefixtures("float64")


def _case() -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)
    )
    model = model.double().eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(30, 2, 6, generator=gen, dtype=torch.float64)
    return model, TensorDataset(x, torch.randint(0, 4, (30,), generator=gen))


@pytest.mark.parametrize("batched", [None, True, False])
@pytest.mark.parametrize("kind", ["gauss_newton", "hessian"])
def test_products_one_vector_per_pass_or_vmapped_equal_the_dense_matrix(
    batched: bool | None, kind: str, reference
) -> None:
    model, data = _case()
    x, y = data.tensors
    full = reference.hessian(model, x, y) if kind == "hessian" else reference.gauss_newton(model, x)
    fm = FunctionalModel(model, ClassificationTask())
    passes = VectorPasses(batched=batched)
    v = torch.randn(5, fm.n_params)
    out, pullback = outputs_and_pullback(fm, x)
    if kind == "hessian":
        got = hessian_products(fm, x, y, v, chunk=2, passes=passes)
    else:
        got = gauss_newton_products(fm, x, y, out, v, chunk=2, passes=passes, pullback=pullback)
    torch.testing.assert_close(got / len(x), v @ full, rtol=1e-9, atol=1e-12)
    # an undecided plan is decided by timing both ways on this block of five
    assert passes.batched is not None
    if batched is None:
        assert passes.batched_s is not None and passes.single_s is not None


def test_curvature_decides_once_and_its_subsamples_share_the_decision(reference) -> None:
    model, data = _case()
    fm = FunctionalModel(model, ClassificationTask())
    curvature = Curvature(fm, as_indexed(data, batch_size=8))
    v = torch.randn(3, fm.n_params)
    full = reference.gauss_newton(model, data.tensors[0])
    torch.testing.assert_close(curvature.matvec(v, exact=True), v @ full, rtol=1e-9, atol=1e-12)
    decided = curvature.passes.batched
    child = curvature.subsample(10, None, torch.Generator().manual_seed(0))
    assert child.passes is curvature.passes and decided is not None


@pytest.mark.parametrize("case", ["mlp", "mixed", "conv2d"])
def test_products_from_per_layer_factors_equal_the_forward_and_reverse_ones(case: str) -> None:
    """benchmarks/output_jacobians.py (measured against the package's products, not used by
    it): exact on an MLP, on covered layers mixed with others (a Conv1d and a BatchNorm on
    per-example Jacobians) and on strided, padded convolutions."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from output_jacobians import LayerProducts  # benchmarks/output_jacobians.py

    torch.manual_seed(5)
    if case == "mlp":
        model: nn.Module = nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 4))
        x = torch.randn(9, 3)
    elif case == "mixed":
        model, data = _case()
        x = data.tensors[0][:9]
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(3, 2, 2, bias=False),
            nn.Flatten(), nn.Linear(8, 4),
        )  # fmt: skip
        x = torch.randn(9, 2, 6, 6)
    model, x = model.double(), x.double()
    y = torch.randint(0, 4, (9,))
    fm = FunctionalModel(model, ClassificationTask())
    products = LayerProducts(fm)
    assert products.covers_any and (products.rest_numel > 0) == (case == "mixed")
    v = torch.randn(3, fm.n_params)
    out, pullback = outputs_and_pullback(fm, x)
    expected = gauss_newton_products(fm, x, y, out, v, pullback=pullback)
    got = products.products(products.factors(x, y), v)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["gauss_newton", "hessian"])
def test_a_batch_in_parts_of_a_few_examples_gives_the_same_products(
    kind: str, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CPU pass holding three examples' activations splits a batch of 16 into six parts.
    from lightning_influence.core import passes

    model, data = _case()
    x, y = data.tensors
    full = reference.hessian(model, x, y) if kind == "hessian" else reference.gauss_newton(model, x)
    fm = FunctionalModel(model, ClassificationTask())
    curvature = Curvature(fm, as_indexed(data, batch_size=16), kind=kind)  # type: ignore[arg-type]
    per_example = passes.measure_activation_bytes(fm, x)
    monkeypatch.setattr(passes, "PASS_BYTES", 3 * per_example)
    assert curvature._examples_per_pass(x, 16) == 3
    sizes: list[int] = []
    products = curvature._products

    def spy(inputs: torch.Tensor, *rest: object) -> torch.Tensor:
        sizes.append(len(inputs))
        return products(inputs, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(curvature, "_products", spy)
    v = torch.randn(4, fm.n_params)
    torch.testing.assert_close(curvature.matvec(v, exact=True), v @ full, rtol=1e-9, atol=1e-12)
    assert sizes == [2, 3, 3, 2, 3, 3, 2, 3, 3, 3, 3]  # batches of 16 and 14, in even parts
