"""Preconditioned LiSSA against an explicit float64 inverse built without the package."""

from __future__ import annotations

import io
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import agreement
import pytest
import torch
from torch import nn

from lightning_influence import Curvature, Exact, LiSSA, LowRank, compute_influence
from lightning_influence.core.data import as_indexed
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.task import ClassificationTask


def _small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("damping", [1e-3, 1e-4])
def test_preconditioned_matches_the_explicit_inverse_where_plain_needs_thousands(
    damping: float, digits: Callable[..., tuple], reference: type
) -> None:
    train, _ = digits(n_train=400)
    x, y = train.tensors
    model = _small_mlp()
    matrix = reference.gauss_newton(model, x)
    evals = torch.linalg.eigvalsh(matrix)
    plain_steps = 3 * float(evals.max() + damping) / damping  # what the plain series would need
    assert plain_steps > 1_000
    v = reference.gradients(model, x[:6], y[:6])
    expected = v @ reference.inverse(matrix, damping)
    curvature = Curvature(FunctionalModel(model, ClassificationTask()), as_indexed(train))
    solved, info = LiSSA(probe_examples=0, residual_tol=1e-4).solve(curvature, v, damping)
    assert _rel(solved, expected) < 1e-2
    assert info["steps"] < plain_steps / 4
    assert info["relative_residual"] <= 1e-4


def test_plain_lissa_is_still_available(digits: Callable[..., tuple], reference: type) -> None:
    train, _ = digits(n_train=300)
    x, y = train.tensors
    model = _small_mlp()
    damping = 0.1
    matrix = reference.gauss_newton(model, x)
    v = reference.gradients(model, x[:3], y[:3])
    curvature = Curvature(FunctionalModel(model, ClassificationTask()), as_indexed(train))
    solved, info = LiSSA(preconditioner=None, batch_size=300).solve(curvature, v, damping)
    assert _rel(solved, v @ reference.inverse(matrix, damping)) < 2e-2
    assert "preconditioned_condition_number" not in info


@pytest.mark.slow
def test_hessian_mode_matches_exact_at_an_optimum(
    digits: Callable[..., tuple], fit_lbfgs: Callable[..., nn.Module], reference: type
) -> None:
    train, val = digits(n_train=300)
    x, y = train.tensors
    model = fit_lbfgs(_small_mlp(), x, y, 0.01)
    damping = 0.01
    matrix = reference.hessian(model, x, y)
    v = reference.gradients(model, *val[:5])
    curvature = Curvature(
        FunctionalModel(model, ClassificationTask()), as_indexed(train), "hessian"
    )
    solved, info = LiSSA(probe_examples=0, residual_tol=1e-4).solve(curvature, v, damping)
    assert _rel(solved, v @ reference.inverse(matrix, damping)) < 1e-2
    assert info["preconditioner_most_negative_eigenvalue"] <= 0


def test_indefinite_hessian_raises_and_suggests_a_damping(digits: Callable[..., tuple]) -> None:
    train, _ = digits(n_train=200)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()  # untrained
    curvature = Curvature(
        FunctionalModel(model, ClassificationTask()), as_indexed(train), "hessian"
    )
    full_rank = LowRank(rank=curvature.n_params, method="lanczos")
    with pytest.raises(ValueError, match=r"not positive definite.*Pass `damping="):
        LiSSA(preconditioner=full_rank).solve(curvature, torch.randn(2, curvature.n_params), 1e-6)


@dataclass(frozen=True)
class _CountingLowRank(LowRank):
    calls: ClassVar[list[int]] = []

    def factorize(self, curvature, damping, progress=False):  # type: ignore[no-untyped-def]
        self.calls.append(1)
        return super().factorize(curvature, damping, progress)


def test_one_factorization_serves_lissa_and_self_influence(digits: Callable[..., tuple]) -> None:
    train, val = digits(n_train=300)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()  # > 512
    _CountingLowRank.calls.clear()
    result = compute_influence(
        model, train, val, solver=LiSSA(preconditioner=_CountingLowRank(), tol=1e-3), damping=1e-2,
        val_indices=range(4), progress=False,
    )  # fmt: skip
    assert len(_CountingLowRank.calls) == 1
    d = result.diagnostics
    assert d["self_influence_matvecs"] == d["solver_preconditioner_matvecs"] > 0
    exact = compute_influence(
        model, train, val, solver=Exact(), damping=1e-2, val_indices=range(4), progress=False,
        self_influence_solver=LowRank(),
    )  # fmt: skip
    assert _rel(result.scores, exact.scores) < 1e-2
    # the shared factorization gives the self-influence LowRank() gives on its own
    torch.testing.assert_close(result.self_influence, exact.self_influence, rtol=1e-6, atol=0)


def _regression_problem() -> tuple[nn.Module, torch.utils.data.TensorDataset]:
    """pyDVL's closed-form case: linear regression with 4 outputs and 20 inputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 20, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(20, 4, generator=gen, dtype=torch.float64)
    y += 0.1 * torch.randn(200, 4, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    return nn.Linear(20, 4).double(), torch.utils.data.TensorDataset(x, y)


def _closed_form(model: nn.Linear, data: torch.utils.data.TensorDataset, damping: float):
    """Scores and self-influence of the mean per-example squared error (averaged over the 4
    outputs), from its explicit Hessian: no package code."""
    x, y = data.tensors
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # [n, 21]
    residual = (xb @ torch.cat([model.weight, model.bias[:, None]], 1).T.detach()) - y  # [n, 4]
    k = y.shape[1]
    grads = (2 / k) * torch.einsum("no,ni->noi", residual, xb)  # [n, 4, 21]
    grads = torch.cat([grads[:, :, :20].reshape(len(x), -1), grads[:, :, 20]], 1)  # weight, bias
    gram = (2 / k) * xb.T @ xb / len(x)  # each output's block of the Hessian
    hessian = torch.zeros(grads.shape[1], grads.shape[1], dtype=x.dtype)
    for o in range(k):
        rows = [*range(o * 20, o * 20 + 20), 80 + o]
        hessian[torch.tensor(rows)[:, None], torch.tensor(rows)] = gram
    inverse = torch.linalg.inv(hessian + damping * torch.eye(len(hessian), dtype=x.dtype))
    return -grads @ inverse @ grads.T, torch.einsum("np,pq,nq->n", grads, inverse, grads)


def test_lowrank_on_a_four_output_regression_is_accurate_or_warns() -> None:
    from lightning_influence import RegressionTask

    model, data = _regression_problem()
    scores, self_influence = _closed_form(model, data, 0.1)
    options = dict(damping=0.1, task=RegressionTask(), progress=False, val_indices=range(20))
    with pytest.warns(UserWarning, match="output Hessians' trace"):
        compute_influence(model, data, data, solver=LowRank(), **options)
    # max_condition near 1: the rest of the space, inverted as 1 / damping, holds little curvature
    exact_gn = LowRank(output_directions=None, max_examples=None, max_condition=2)
    result = compute_influence(
        model, data, data, solver=exact_gn, self_influence_solver=exact_gn, **options
    )
    assert (
        torch.corrcoef(torch.stack([result.scores.flatten(), scores[:, :20].flatten()]))[0, 1]
        > 0.99
    )
    assert agreement.spearman(result.self_influence, self_influence) > 0.99


def test_a_block_above_the_memory_budget_is_solved_in_chunks(
    digits: Callable[..., tuple], reference: type
) -> None:
    train, _ = digits(n_train=200)
    x, y = train.tensors
    model = _small_mlp()
    matrix = reference.gauss_newton(model, x)
    v = reference.gradients(model, x[:5], y[:5])
    curvature = Curvature(FunctionalModel(model, ClassificationTask()), as_indexed(train))
    budget = 10 * curvature.n_params * 8 * 2  # two rows at a time
    solver = LiSSA(max_block_memory=budget, probe_examples=0, residual_tol=1e-4)
    solved, info = solver.solve(curvature, v, 0.1)
    assert info["chunks"] == 3
    assert _rel(solved, v @ reference.inverse(matrix, 0.1)) < 1e-2


def _fitted_scores(digits: Callable[..., tuple], solver: object) -> tuple:
    """Scores of the small MLP on 1,000 digits (damping 1e-4, 6 validation points) with
    ``solver``, and any warnings."""
    train, val = digits(n_train=1000)
    options = dict(damping=1e-4, val_indices=range(6), progress=False, self_influence=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compute_influence(_small_mlp(), train, val, solver=solver, **options)
    return result, [str(w.message) for w in caught if w.category is UserWarning]


@pytest.mark.slow
def test_stops_on_the_scores_within_its_tolerance_of_exact(digits: Callable[..., tuple]) -> None:
    exact, _ = _fitted_scores(digits, Exact())
    former, _ = _fitted_scores(digits, LiSSA(probe_examples=0, residual_tol=3e-3))
    answer, caught = _fitted_scores(digits, LiSSA())
    d, tol = answer.diagnostics, LiSSA().tol
    assert not caught
    assert d["solver_stopped_on_scores"] == 1 and d["solver_probe_examples"] == 64
    assert d["solver_score_distance"] <= tol and d["solver_score_rank_distance"] <= tol
    # the estimate on 64 probe examples holds for every training example's scores
    assert _rel(answer.scores, exact.scores) <= tol
    assert agreement.pearson(answer.scores, exact.scores) >= 0.99
    assert agreement.spearman(answer.scores, exact.scores) >= 0.97
    assert d["solver_steps"] <= former.diagnostics["solver_steps"]
    assert d["solver_relative_residual"] > former.diagnostics["solver_relative_residual"] / 10


class _Clock:
    """A clock that advances one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


@pytest.mark.slow
def test_a_budget_stops_with_the_best_iterate_and_says_how_far_it_was(
    digits: Callable[..., tuple], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_influence.solvers import lissa, stopping

    exact, _ = _fitted_scores(digits, Exact())
    clock = _Clock()  # read by the solve's start and twice by each check (its test, the bar)
    monkeypatch.setattr(lissa, "time", clock)
    monkeypatch.setattr(stopping, "time", clock)
    budgeted, caught = _fitted_scores(digits, LiSSA(budget_seconds=50.5, tol=1e-6))
    d = budgeted.diagnostics
    assert d["solver_stopped_by_budget"] == 1 and d["solver_stopped_on_scores"] == 0
    assert len(caught) == 1 and "stopped at its budget (`budget_seconds=50.5`)" in caught[0]
    assert f"{d['solver_score_distance']:.1%} from converged" in caught[0]
    assert d["solver_steps"] == 26  # conjugate gradients from the start: two reads a step
    # the best iterate so far, and an estimate on the safe side of the scores' true distance
    error = _rel(budgeted.scores, exact.scores)
    assert 0.01 < error < d["solver_score_distance"]
    assert agreement.pearson(budgeted.scores, exact.scores) > 0.99


def test_the_estimate_is_the_rest_of_a_geometric_series() -> None:
    from lightning_influence.solvers.stopping import Stopping

    halves = iter(torch.tensor([[1.0], [2.0]]) * (2 - 0.5**k) for k in range(10))

    class Probe:
        indices = torch.arange(2)

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return next(halves)  # converges to [2, 4]; each change half the last

        def any(self, flag: bool) -> bool:
            return flag

        def epoch_seconds(self) -> float:
            return 1.0

    stop = Stopping(tol=0.01, residual_tol=1e-9, probe=Probe(), span=2)
    residual = torch.ones(1)
    assert not any(stop.check(torch.zeros(1, 3), residual, k) for k in range(5))
    # scores (2 - 1/16) x [1, 2] after five checks: changed by 3/16 over the last two steps, a
    # quarter of the two before, so 3/16 / 3 = 1/16 is left to come
    assert stop.estimate()[0] == pytest.approx((3 / 16 / 3) / (2 - 1 / 16), rel=1e-6)
    assert stop.estimate()[1] == pytest.approx(0.0, abs=1e-12)  # the ranks never changed
    # a residual above tol / 2 holds it back (a stalled solve); below, it stops on the scores
    assert not stop.check(torch.zeros(1, 3), residual, 5)
    while not stop.check(torch.zeros(1, 3), residual / 1000, stop.steps + 1):
        pass
    assert stop.reason == "scores" and stop.estimate()[0] <= 0.01
    # the progress bar shows the estimate and the residual
    from tqdm.auto import tqdm

    bar = tqdm(file=io.StringIO())
    stop.show(bar)
    assert re.fullmatch(
        r"scores ~0\.\d% from converged \(ranks 0\.0%\), residual 1\.0e-03", bar.postfix
    )


def test_each_row_settles_on_its_own_scores() -> None:
    from lightning_influence.solvers.stopping import Stopping

    # column 0 converges at once, column 1 moves by a tenth of its size at every check
    checks = iter(torch.tensor([[1.0, 1.0 + 0.1 * k], [2.0, -1.0 - 0.1 * k]]) for k in range(9))

    class Probe:
        indices = torch.arange(2)

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return next(checks)

    stop = Stopping(tol=0.05, residual_tol=1e-9, probe=Probe(), span=2)  # type: ignore[arg-type]
    residual = torch.tensor([1e-3, 1e-3])
    for k in range(5):
        stop.check(torch.zeros(2, 3), residual, k)
    assert stop.settled is not None and stop.settled.tolist() == [True, False]
    assert not stop.done and stop.row_distance is not None
    assert float(stop.row_distance[0].max()) == 0.0 and float(stop.row_distance[1, 0]) > 0.05
    # a settled row stays settled; the solve stops once every row is
    for k in range(5, 9):
        stop.check(torch.zeros(2, 3), torch.tensor([1e-3, 1e-12]), k)
    assert stop.settled.tolist() == [True, True] and stop.reason == "scores"


def test_a_true_residual_above_the_recurred_one_reopens_its_row() -> None:
    from lightning_influence.solvers.stopping import Stopping

    stop = Stopping(tol=None, residual_tol=1e-3, probe=None)
    assert stop.check(torch.zeros(2, 3), torch.tensor([1e-4, 1e-4]), 1)  # recurred residuals
    stop.reopen(torch.tensor([5e-3, 2e-4]))  # the true ones: the first row is not done
    assert not stop.done and stop.settled is not None and stop.settled.tolist() == [False, True]
    assert not stop.check(torch.zeros(2, 3), torch.tensor([2e-3, 2e-4]), 2)
    assert stop.check(torch.zeros(2, 3), torch.tensor([5e-4, 2e-4]), 3)
    stop.reopen(torch.tensor([9e-4, 2e-4]))  # below: the stop stands
    assert stop.reason == "residual"


def test_conjugate_gradients_multiply_only_the_rows_not_done() -> None:
    from types import SimpleNamespace

    from tqdm.auto import tqdm

    from lightning_influence.solvers.cg import conjugate_gradients

    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    matrix = q @ torch.diag(torch.logspace(0, 2, 6, dtype=torch.float64)) @ q.T
    rows_seen: list[int] = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        rows_seen.append(v.shape[0])
        return v @ matrix

    b = torch.randn(2, 6, dtype=torch.float64)
    done_after_one = torch.tensor([True, False])

    def run(
        on_step: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None,
    ) -> torch.Tensor:
        return conjugate_gradients(
            SimpleNamespace(matvec=matvec), 0.0, torch.zeros_like(b), b.clone(),
            b.norm(dim=1), 1e-12, 20, tqdm(disable=True), on_step=on_step,
        )[0]  # fmt: skip

    x = run(lambda x, rel, steps: done_after_one)
    assert rows_seen[0] == 2 and set(rows_seen[1:]) == {1}
    expected = torch.linalg.solve(matrix, b.T).T
    assert torch.allclose(x[1], expected[1], rtol=1e-9, atol=1e-12)
    # the finished row stays at its first step's iterate, as an unfinished run had it then
    first = conjugate_gradients(
        SimpleNamespace(matvec=matvec), 0.0, torch.zeros_like(b), b.clone(), b.norm(dim=1),
        1e-12, 1, tqdm(disable=True),
    )[0]  # fmt: skip
    assert torch.equal(x[0], first[0]) and not torch.allclose(x[0], expected[0], rtol=1e-3)


@pytest.mark.slow
def test_the_preconditioner_sketch_stays_within_max_memory_and_the_estimate_counts_it(
    digits: Callable[..., tuple],
) -> None:
    from lightning_influence.memory import estimate_bytes
    from lightning_influence.solvers.sketch import bytes_per_vector

    train, _ = digits(n_train=200)
    fm = FunctionalModel(_small_mlp(), ClassificationTask())
    curvature = Curvature(fm, as_indexed(train))
    p = curvature.n_params
    max_memory = 9 * bytes_per_vector(p, 8)  # nine float64 sketch vectors and what they hold
    preconditioner = LowRank(max_examples=None, output_directions=None, max_memory=max_memory)
    with pytest.warns(UserWarning, match="the most that `max_memory"):
        _, info = LiSSA(preconditioner).solve(curvature, torch.randn(2, p).double(), 1e-4)
    assert info["preconditioner_rank_limited_by_memory"] == 1
    assert info["preconditioner_matvecs"] == 9  # 9 products: its top 4 kept
    assert info["preconditioner_rank"] == 4
    stages = estimate_bytes(p, 2, 64, 8, [LiSSA(preconditioner)])
    assert stages["low-rank factorization (LowRank's max_memory)"] == max_memory + 2 * p * 8


def _on_two_threads(work: Callable[[int, Callable], object]) -> list[object]:
    """``work(rank, reduce)`` on two threads standing for two processes, ``reduce`` summing a
    tensor over them (the all-reduce)."""
    barrier, slots = threading.Barrier(2, timeout=60), [torch.zeros(0)] * 2
    results: list[object] = [None, None]

    def reduce_for(rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        return reduce

    def target(rank: int) -> None:
        try:
            results[rank] = work(rank, reduce_for(rank))
        except Exception as err:  # pragma: no cover - shown by the assertion below
            results[rank] = err

    threads = [threading.Thread(target=target, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_two_processes_probe_the_same_examples_as_one(digits: Callable[..., tuple]) -> None:
    train, _ = digits(n_train=300)
    fm = FunctionalModel(_small_mlp(), ClassificationTask())
    data = as_indexed(train, batch_size=64)
    v = torch.randn(3, fm.n_params, generator=torch.Generator().manual_seed(0), dtype=fm.dtype)

    lock = threading.Lock()

    def work(rank: int, reduce: Callable | None) -> tuple:
        shard = data.subset(data.indices[rank::2]) if reduce is not None else data
        probe = Curvature(fm, shard, reduce=reduce).probe(64, seed=0)
        with lock:  # torch.func transforms are not thread-safe: one "process" at a time
            probe.prepare()
        return probe.indices, probe(v), probe.any(rank == 1)

    one = work(0, None)
    assert len(one[0]) == 64 and not one[2]
    for two in _on_two_threads(work):
        assert isinstance(two, tuple), two
        assert torch.equal(two[0], one[0])  # the same dataset indices on every process
        torch.testing.assert_close(two[1], one[1], rtol=1e-10, atol=1e-12)
        assert two[2]  # one process over its budget stops both
