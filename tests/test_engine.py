"""The numerical core against references computed without the package, in float64.

References come from the ``reference`` fixture (tests/conftest.py): per-example gradients from a
loop of batch-size-1 backward passes, the Hessian from ``torch.func.hessian``, the Gauss-Newton
matrix from dense Jacobians, closed forms for logistic and least-squares regression, and inverses
from ``torch.linalg.solve``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import (
    CG,
    ClassificationTask,
    Curvature,
    Exact,
    FunctionalModel,
    InfluenceResult,
    LiSSA,
    RegressionTask,
    SolverDivergedError,
    Task,
    TaskError,
    as_indexed,
    compute_influence,
    influence_on_parameters,
    perturbation_influence,
    select_parameters,
)
from lightning_influence.core import passes
from lightning_influence.core.gradients import per_sample_gradients

pytestmark = pytest.mark.usefixtures("float64")


def _toy(n: int = 40, d: int = 5, classes: int = 3) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(n, d, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    )


def _mlp(d: int = 5, classes: int = 3) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, classes)).double()


def _curvature(
    model: nn.Module, data: TensorDataset, kind: str = "gauss_newton", batch_size: int = 64
) -> Curvature:
    """The package's curvature of the mean cross-entropy on ``data`` (the one place it is built)."""
    fm = FunctionalModel(model, ClassificationTask())
    return Curvature(fm, as_indexed(data, batch_size=batch_size), kind=kind)  # type: ignore[arg-type]


class _BatchNormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_per_sample_gradients_equal_a_loop_of_single_backward_passes(kind: str, reference) -> None:
    if kind == "mlp":
        model, data = _mlp(), _toy()
        x, y = data.tensors
    else:
        model = _BatchNormCNN().double()
        with torch.no_grad():  # non-trivial running statistics
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
        model.eval()
        x, y = torch.randn(12, 1, 4, 4), torch.randint(0, 4, (12,))
    fm = FunctionalModel(model, ClassificationTask())
    got = per_sample_gradients(fm, x, y)
    torch.testing.assert_close(got, reference.gradients(model, x, y), rtol=1e-10, atol=1e-12)


class _NotVmappable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() > 1e9:  # data-dependent control flow: vmap cannot trace it
            return x
        return self.lin(x)


def test_a_model_that_cannot_be_vmapped_falls_back_to_the_same_numbers(reference) -> None:
    model = _NotVmappable().double()
    x, y = _toy().tensors
    fm = FunctionalModel(model, ClassificationTask())
    with pytest.warns(UserWarning, match="falling back"):
        got = per_sample_gradients(fm, x, y)
    torch.testing.assert_close(got, reference.gradients(model, x, y))


@pytest.mark.parametrize("batch_size", [7, 40])
def test_hessian_products_equal_torch_func_hessian(batch_size: int, reference) -> None:
    model, data = _mlp(), _toy()
    full = reference.hessian(model, *data.tensors)
    curvature = _curvature(model, data, "hessian", batch_size)
    v = torch.randn(4, len(full))
    torch.testing.assert_close(curvature.matvec(v), v @ full, rtol=1e-9, atol=1e-12)
    eye = torch.eye(len(full))
    torch.testing.assert_close(curvature.matvec(eye), full, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["hessian", "gauss_newton"])
def test_forward_mode_products_in_chunks_of_vectors_equal_the_dense_matrix(
    kind: str, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A budget of two vectors' tangents per pass splits the five vectors into three passes.
    model, data = _mlp(), _toy()
    x, y = data.tensors
    full = reference.hessian(model, x, y) if kind == "hessian" else reference.gauss_newton(model, x)
    curvature = _curvature(model, data, kind, batch_size=40)
    per_example = passes.measure_activation_bytes(curvature.model, x)
    # inputs, tanh outputs and the second layer's inputs, 5 + 6 + 6 float64 numbers at most twice
    assert 11 * 8 <= per_example <= 2 * 17 * 8
    monkeypatch.setattr(passes, "TANGENT_BYTES", 2 * 40 * per_example)
    assert curvature._vectors_per_pass(x, 40) == 2
    v = torch.randn(5, len(full))
    torch.testing.assert_close(curvature.matvec(v), v @ full, rtol=1e-9, atol=1e-12)


# The products are formed by forward-and-reverse passes or from per-example Jacobians, chosen by
# the shapes: one vector takes the former; two outputs with 40 vectors the latter (as do three
# outputs with 40 vectors under a simpler count). Each shape is checked against one reference.
@pytest.mark.parametrize(("classes", "n_vectors"), [(3, 1), (2, 40), (3, 40), (12, 2)])
def test_gauss_newton_products_equal_jacobian_reference(
    classes: int, n_vectors: int, reference
) -> None:
    model, data = _mlp(classes=classes), _toy(classes=classes)
    x, _ = data.tensors
    expected = reference.gauss_newton(model, x)
    curvature = _curvature(model, data, "gauss_newton", batch_size=16)
    v = torch.randn(n_vectors, len(expected))
    torch.testing.assert_close(curvature.matvec(v), v @ expected, rtol=1e-9, atol=1e-12)
    if n_vectors == 1:  # the matrix the products apply, column by column
        columns = torch.stack([curvature.matvec(e[None])[0] for e in torch.eye(len(expected))])
        eig = torch.linalg.eigvalsh((columns + columns.T) / 2)
        assert eig.min() > -1e-12  # positive semi-definite even though the model is not convex


def _conv_problem() -> tuple[nn.Module, TensorDataset]:
    """A small convolution in evaluation mode: its per-example Jacobians are worth keeping."""
    torch.manual_seed(4)
    model = _BatchNormCNN().double().eval()
    gen = torch.Generator().manual_seed(5)
    data = TensorDataset(
        torch.randn(40, 1, 4, 4, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    )
    return model, data


def test_gauss_newton_products_of_a_convolution_equal_jacobian_reference(reference) -> None:
    model, data = _conv_problem()
    x, _ = data.tensors
    expected = reference.gauss_newton(model, x)
    curvature = _curvature(model, data, "gauss_newton", batch_size=16)
    for n_vectors in (1, 30):
        v = torch.randn(n_vectors, len(expected))
        torch.testing.assert_close(curvature.matvec(v), v @ expected, rtol=1e-9, atol=1e-12)
    assert curvature.factors() is not None  # the dense matrix is formed from them directly
    torch.testing.assert_close(curvature.dense(chunk=16), expected, rtol=1e-9, atol=1e-12)


def test_curvature_and_scores_of_logistic_regression_equal_the_closed_form(reference) -> None:
    data = _toy(60, 4, 3)
    x, y = data.tensors
    torch.manual_seed(3)
    model = nn.Linear(4, 3).double()
    damping = 0.05
    analytic = reference.logistic_hessian(model, x)
    g = reference.logistic_gradients(model, x, y)
    inverse = reference.inverse(analytic, damping)
    eye = torch.eye(len(analytic))
    for kind in ("hessian", "gauss_newton"):
        curvature = _curvature(model, data, kind, batch_size=25)
        torch.testing.assert_close(curvature.matvec(eye), analytic, rtol=1e-9, atol=1e-12)
        result = compute_influence(
            model, data, data, solver=Exact(), damping=damping, curvature=kind, progress=False
        )
        torch.testing.assert_close(result.scores, -g @ inverse @ g.T, rtol=1e-8, atol=1e-10)
        expected_self = torch.einsum("ip,pq,iq->i", g, inverse, g)
        torch.testing.assert_close(result.self_influence, expected_self, rtol=1e-8, atol=1e-10)
        assert result.diagnostics["solver_min_eigenvalue"] >= damping - 1e-12


# LiSSA with minibatches of 64 sees all the data (conjugate gradients); with 16 it runs on
# minibatches, the convolution's drawn from its stored Jacobians. Both with a tight `tol`.
@pytest.mark.parametrize(
    ("solver", "bound"),
    [(CG(), 1e-6), (LiSSA(batch_size=64, tol=1e-5), 1e-5), (LiSSA(batch_size=16, tol=1e-6), 1e-5)],
    ids=["cg", "lissa", "lissa-minibatches"],
)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_iterative_solvers_match_a_direct_solve_on_a_small_problem(
    solver, bound: float, kind: str, reference
) -> None:
    if kind == "mlp":
        model, data, chosen = _mlp(), _toy(64), [0, 5, 11, 23, 42, 63]
    else:
        (model, data), chosen = _conv_problem(), [0, 5, 11, 23, 31, 39]
    x, y = data.tensors
    damping = 0.1
    expected = reference.gradients(model, x[chosen], y[chosen]) @ reference.inverse(
        reference.gauss_newton(model, x), damping
    )
    got = -influence_on_parameters(model, data, chosen, solver=solver, damping=damping)
    rel = (got - expected).norm() / expected.norm()
    assert rel < bound, rel


def test_lissa_with_a_too_small_scale_raises_the_divergence_error() -> None:
    data, model = _toy(64), _mlp()
    with pytest.raises(SolverDivergedError, match=r"scale.*damping"):
        compute_influence(
            model,
            data,
            data,
            solver=LiSSA(preconditioner=None, scale=1e-3, depth=2000),
            damping=0.1,
            progress=False,
        )


def test_lissa_arguments_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="scale"):
        LiSSA(scale=-1.0)
    with pytest.raises(ValueError, match="depth"):
        LiSSA(depth=0)
    with pytest.raises(ValueError, match="momentum"):
        LiSSA(momentum=1.5)


def test_exact_refuses_large_models_and_names_other_solvers() -> None:
    data, model = _toy(), _mlp()
    with pytest.raises(ValueError, match="LiSSA"):
        compute_influence(model, data, data, solver=Exact(max_params=10), progress=False)


def test_scores_do_not_depend_on_batch_sizes_and_keep_dataset_indices() -> None:
    data, model = _toy(), _mlp()
    kwargs = dict(solver=Exact(), damping=0.1, progress=False, val_indices=[3, 1, 7])
    a = compute_influence(model, data, data, batch_size=5, curvature_batch_size=7, **kwargs)
    b = compute_influence(model, DataLoader(data, batch_size=17, shuffle=True), data, **kwargs)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.self_influence, b.self_influence)
    assert a.val_indices.tolist() == [3, 1, 7]
    assert a.train_indices.tolist() == list(range(len(data)))


def test_scores_are_minus_val_gradient_times_inverse_times_train_gradient(reference) -> None:
    data, model = _toy(), _mlp()
    x, y = data.tensors
    damping = 0.2
    result = compute_influence(model, data, data, solver=Exact(), damping=damping, progress=False)
    g = reference.gradients(model, x, y)
    inverse = reference.inverse(reference.gauss_newton(model, x), damping)
    torch.testing.assert_close(result.scores, -g @ inverse @ g.T, rtol=1e-8, atol=1e-10)
    expected_self = torch.einsum("ip,pq,iq->i", g, inverse, g)
    torch.testing.assert_close(result.self_influence, expected_self, rtol=1e-8, atol=1e-10)
    assert bool((result.self_influence > 0).all())
    torch.testing.assert_close(result.removal_effect, -result.scores / len(data))


def test_rankings_are_ordered_and_carry_dataset_indices() -> None:
    data, model = _toy(), _mlp()
    result = compute_influence(
        model, data, data, solver=Exact(), damping=0.1, progress=False, train_indices=range(10, 40)
    )
    helpful, harmful = result.helpful(k=4), result.harmful(k=4)
    for j in range(result.scores.shape[1]):
        column = result.scores[:, j]
        order = torch.argsort(column)
        assert helpful.indices[j].tolist() == result.train_indices[order[:4]].tolist()
        assert harmful.indices[j].tolist() == result.train_indices[order.flip(0)[:4]].tolist()
    assert bool((helpful.indices >= 10).all())
    outliers = result.outliers(5)
    assert outliers.scores.tolist() == sorted(result.self_influence.tolist(), reverse=True)[:5]


def test_influence_on_parameters_is_minus_inverse_times_gradient(reference) -> None:
    data, model = _toy(), _mlp()
    x, y = data.tensors
    damping = 0.1
    got = influence_on_parameters(model, data, [4, 9], solver=Exact(), damping=damping)
    g = reference.gradients(model, x[[4, 9]], y[[4, 9]])
    inverse = reference.inverse(reference.gauss_newton(model, x), damping)
    torch.testing.assert_close(got, -g @ inverse, rtol=1e-8, atol=1e-10)


def test_perturbation_influence_equals_autograd_double_backward() -> None:
    data, model = _toy(), _mlp()
    fm = FunctionalModel(model, ClassificationTask())
    s = torch.randn(2, fm.n_params)
    x, y = data[:3]
    got = perturbation_influence(fm, (x, y), s)  # [3, 2, d]
    params = dict(model.named_parameters())
    for i in range(3):
        for j in range(2):
            xi = x[i : i + 1].clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(functional_call(model, params, (xi,)), y[i : i + 1])
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            flat = torch.cat([g.reshape(-1) for g in grads])
            (dx,) = torch.autograd.grad(-(flat * s[j]).sum(), xi)
            torch.testing.assert_close(got[i, j], dx[0], rtol=1e-9, atol=1e-12)


def test_perturbation_maps_belong_to_the_top_examples() -> None:
    data, model = _toy(), _mlp()
    result = compute_influence(
        model, data, data, solver=Exact(), damping=0.1, progress=False, perturbation_k=2
    )
    assert result.perturbation is not None and result.perturbation.shape == (40, 4, 5)
    assert result.perturbation_indices[:, :2].tolist() == result.helpful(2).indices.tolist()
    assert result.perturbation_indices[:, 2:].tolist() == result.harmful(2).indices.tolist()


def test_save_and_load_round_trip_exactly(tmp_path: Path) -> None:
    data, model = _toy(), _mlp()
    result = compute_influence(
        model, data, data, solver=Exact(), damping=0.1, progress=False, perturbation_k=1
    )
    loaded = InfluenceResult.load(result.save(tmp_path / "influence.pt"))
    assert loaded.equals(result)
    assert loaded.settings["solver"]["name"] == "exact"


def test_load_refuses_other_files(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a lightning-influence result"):
        InfluenceResult.load(tmp_path / "other.pt")


def test_float64_on_request_and_model_left_untouched() -> None:
    model = _BatchNormCNN().float()
    model.train()
    images = TensorDataset(torch.randn(20, 1, 4, 4).float(), torch.randint(0, 4, (20,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = compute_influence(
        model, images, images, solver=Exact(), damping=0.1, progress=False, dtype=torch.float64
    )
    assert result.scores.dtype == torch.float64
    assert model.training and model.bn.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32


def test_progress_bars_can_be_silenced(capsys: pytest.CaptureFixture[str]) -> None:
    data, model = _toy(), _mlp()
    compute_influence(model, data, data, solver=CG(), damping=0.1, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    compute_influence(model, data, data, solver=CG(), damping=0.1, progress=True)
    assert "Training" in capsys.readouterr().err


def test_an_unsupported_batch_raises_the_task_error() -> None:
    model = _mlp()
    bad = [torch.randn(5) for _ in range(8)]  # a dataset of bare tensors: no targets
    with pytest.raises(TaskError, match="task="):
        compute_influence(model, bad, bad, solver=CG(), progress=False)


def test_a_loss_that_is_not_per_sample_raises_the_task_error() -> None:
    class MeanLoss(ClassificationTask):
        def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(outputs, targets)

    data, model = _toy(), _mlp()
    with pytest.raises(TaskError, match="one loss per example"):
        compute_influence(model, data, data, task=MeanLoss(), solver=CG(), progress=False)


def test_dict_batches_and_a_custom_regression_task() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 3, generator=gen), torch.randn(30, generator=gen)
    rows = [{"features": x[i], "target": y[i]} for i in range(30)]
    model = nn.Linear(3, 1).double()

    class Squeezed(RegressionTask):
        def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return 0.5 * (outputs.squeeze(-1) - targets) ** 2

    result = compute_influence(
        model, rows, rows, task=Squeezed(), solver=Exact(), damping=0.01, progress=False
    )
    # Linear least squares: H = X^T X / n (with a bias column), g_i = r_i * [x_i, 1].
    xa = torch.cat([x, torch.ones(30, 1)], 1)
    residual = (model(x).squeeze(-1) - y).detach()
    g = residual[:, None] * xa
    h = xa.T @ xa / 30 + 0.01 * torch.eye(4)
    torch.testing.assert_close(
        result.scores, -g @ torch.linalg.solve(h, g.T), rtol=1e-8, atol=1e-10
    )


def test_parameter_patterns_select_frozen_never_and_empty_is_an_error() -> None:
    model = _mlp()
    model[0].weight.requires_grad_(False)
    assert select_parameters(model) == ["0.bias", "2.weight", "2.bias"]
    with pytest.warns(UserWarning, match="frozen"):
        assert select_parameters(model, ["0.*"]) == ["0.bias"]
    with pytest.raises(ValueError, match="selects none"):
        select_parameters(model, ["head.*"])
    data = _toy()
    head = compute_influence(
        model, data, data, parameters=["2.*"], solver=Exact(), damping=0.1, progress=False
    )
    assert head.settings["parameters"] == ["2.weight", "2.bias"]
    assert head.settings["n_params"] == 6 * 3 + 3


def test_empty_validation_data_is_an_error() -> None:
    data, model = _toy(), _mlp()
    with pytest.raises(ValueError, match="validation data is empty"):
        compute_influence(model, data, data, val_indices=[], progress=False)


def test_custom_task_for_a_model_that_returns_a_dict() -> None:
    class DictModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.lin(x)}

    class DictTask(Task):
        def loss(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(outputs["logits"], targets, reduction="none")

    torch.manual_seed(0)
    model, plain = DictModel().double(), nn.Linear(5, 3).double()
    plain.load_state_dict({k.removeprefix("lin."): v for k, v in model.state_dict().items()})
    data = _toy()
    kwargs = dict(solver=Exact(), damping=0.1, progress=False)
    a = compute_influence(model, data, data, task=DictTask(), **kwargs)
    b = compute_influence(plain, data, data, **kwargs)
    torch.testing.assert_close(a.scores, b.scores)
