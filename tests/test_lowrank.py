"""LowRank against references computed without the package (the ``reference`` fixture): the
exact and the truncated inverse from ``torch.linalg`` on the Hessian or the Gauss-Newton matrix
built by plain autograd; streamed self-influence against the quadratic form of that inverse."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.stats import spearmanr
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_influence import (
    ClassificationTask,
    Curvature,
    Exact,
    FunctionalModel,
    LowRank,
    RegressionTask,
    Task,
    as_indexed,
    compute_influence,
)

DAMPING = 0.05
KINDS = ["gauss_newton", "hessian"]


def _tiny() -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()  # 39 parameters
    x = torch.randn(60, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (60,))
    return model, TensorDataset(x, y)


def _curvature(
    kind: str = "gauss_newton",
    batch_size: int = 60,
    output_directions: int | None = None,
    model: nn.Module | None = None,
    data: TensorDataset | None = None,
    task: Task | None = None,
) -> Curvature:
    """The package's curvature (of the tiny model unless given; the one place it is built)."""
    if model is None or data is None:
        model, data = _tiny()
    fm = FunctionalModel(model, task or ClassificationTask())
    return Curvature(
        fm,
        as_indexed(data, batch_size=batch_size),
        kind,
        output_directions=output_directions,  # type: ignore[arg-type]
    )


def _matrix(reference, kind: str, directions: int | None = None) -> Tensor:
    """The tiny model's Hessian or Gauss-Newton matrix, by plain autograd."""
    model, data = _tiny()
    x, y = data.tensors
    if kind == "hessian":
        return reference.hessian(model, x, y)
    return reference.gauss_newton(model, x, directions)


def _truncated_inverse(matrix: Tensor, rank: int, damping: float) -> Tensor:
    """``U diag(1 / (l + damping)) U^T + (I - U U^T) / damping`` on the top-``rank`` eigenpairs."""
    evals, evecs = torch.linalg.eigh(matrix)
    top_e, top_u = evals[-rank:], evecs[:, -rank:]
    eye = torch.eye(len(matrix), dtype=matrix.dtype)
    return eye / damping + (top_u * (1 / (top_e + damping) - 1 / damping)) @ top_u.T


def _exact_gn_lowrank(**kwargs: object) -> LowRank:
    """``LowRank`` on the exact Gauss-Newton products, for comparisons with exact references."""
    return LowRank(output_directions=None, **kwargs)  # type: ignore[arg-type]


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_size", [1, 4])
def test_full_rank_equals_the_exact_inverse(kind: str, block_size: int, reference) -> None:
    matrix = _matrix(reference, kind)
    p = len(matrix)
    v = torch.randn(7, p, dtype=torch.float64)
    expected = v @ reference.inverse(matrix, DAMPING)
    low, info = _exact_gn_lowrank(rank=p, method="lanczos", block_size=block_size).solve(
        _curvature(kind), v, DAMPING
    )
    assert _rel(low, expected) < 1e-9
    assert info["rank"] == p and info["matvecs"] == p
    assert info["curvature_passes"] == -(-p // block_size)
    if kind == "hessian":  # the tiny network's Hessian is indefinite; all of it is kept
        assert info["min_eigenvalue"] < 0
        assert torch.linalg.eigvalsh(matrix).min() < 0


@pytest.mark.parametrize("kind", KINDS)
def test_small_rank_equals_truncated_inverse(kind: str, reference) -> None:
    matrix = _matrix(reference, kind)
    curv = _curvature(kind)
    p, rank = len(matrix), 6
    evals = torch.linalg.eigvalsh(matrix)
    v = torch.randn(5, p, dtype=torch.float64)
    expected = v @ _truncated_inverse(matrix, rank, DAMPING)
    # A complete Krylov space: the Ritz pairs are the eigenpairs.
    solver = _exact_gn_lowrank(rank=rank, oversample=p - rank, method="lanczos")
    low, info = solver.solve(curv, v, DAMPING)
    assert _rel(low, expected) < 1e-10
    assert info["max_eigenvalue"] == pytest.approx(float(evals[-1]), rel=1e-10)
    assert info["min_eigenvalue"] == pytest.approx(float(evals[-rank]), rel=1e-10)
    if kind == "gauss_newton":
        # Nystrom from a complete random basis is the matrix itself (up to its tiny shift).
        solver = _exact_gn_lowrank(rank=rank, oversample=p - rank, method="nystrom")
        low, info = solver.solve(curv, v, DAMPING)
        assert _rel(low, expected) < 1e-8
        assert info["curvature_passes"] == 1 and info["matvecs"] == p
    else:
        with pytest.raises(ValueError, match="positive semi-definite"):
            _exact_gn_lowrank(rank=rank, method="nystrom").solve(curv, v, DAMPING)
        # The default picks block Lanczos for the Hessian: 2 passes, complete at this size.
        low, info = _exact_gn_lowrank(rank=rank, oversample=p - rank).solve(curv, v, DAMPING)
        assert info["curvature_passes"] == 2
        assert _rel(low, expected) < 1e-9


def test_default_oversampling_finds_the_top_eigenpairs(digits, fit_lbfgs, reference) -> None:
    # Logistic regression on digits: a convex model with a decaying Gauss-Newton spectrum.
    train, _ = digits(n_train=300)
    x, y = train.tensors
    model = fit_lbfgs(nn.Linear(64, 10).double(), x, y, weight_decay=1e-2, max_iter=100)
    evals = torch.linalg.eigvalsh(reference.logistic_hessian(model, x))
    curv = _curvature(batch_size=300, model=model, data=train)
    # Lanczos with 32 steps: the 8 kept eigenvalues to near machine precision (measured 1e-9).
    _, info = _exact_gn_lowrank(
        rank=8, oversample=24, method="lanczos", max_examples=None
    ).factorize(curv, 1e-2)
    assert info["max_eigenvalue"] == pytest.approx(float(evals[-1]), rel=1e-10)
    assert info["min_eigenvalue"] == pytest.approx(float(evals[-8]), rel=1e-7)
    # The block variant at the same dimension (4 passes of 8) is cruder (measured 1e-4 / 4e-2).
    solver = _exact_gn_lowrank(
        rank=8,
        oversample=24,
        method="lanczos",
        block_size=8,
        max_examples=None,
    )
    _, info = solver.factorize(curv, 1e-2)
    assert info["max_eigenvalue"] == pytest.approx(float(evals[-1]), rel=1e-3)
    assert info["min_eigenvalue"] == pytest.approx(float(evals[-8]), rel=0.1)
    assert info["curvature_passes"] == 4
    # Nystrom from 32 products in one pass: a lower bound, crude on this flat spectrum
    # (measured 0.286 against 0.394); with 128 products it tightens.
    _, info = _exact_gn_lowrank(rank=8, oversample=24, max_examples=None).factorize(curv, 1e-2)
    assert info["curvature_passes"] == 1
    assert 0.5 * float(evals[-1]) < info["max_eigenvalue"] <= float(evals[-1]) * (1 + 1e-12)
    _, more = _exact_gn_lowrank(rank=8, oversample=120, max_examples=None).factorize(curv, 1e-2)
    assert info["max_eigenvalue"] < more["max_eigenvalue"] <= float(evals[-1]) * (1 + 1e-12)


def test_quadratic_form_equals_the_inverse(reference) -> None:
    curv = _curvature("gauss_newton")
    v = torch.randn(9, curv.n_params, dtype=torch.float64)
    low, _ = LowRank(rank=6).factorize(curv, DAMPING)
    assert _rel(low.quadratic(v), (v * low(v)).sum(1)) < 1e-12  # type: ignore[attr-defined]
    # At full rank, against v^T (G + damping I)^-1 v from the Gauss-Newton matrix itself.
    full, _ = _exact_gn_lowrank(rank=curv.n_params, method="lanczos").factorize(curv, DAMPING)
    expected = torch.einsum(
        "ip,pq,iq->i", v, reference.inverse(_matrix(reference, "gauss_newton"), DAMPING), v
    )
    assert _rel(full.quadratic(v), expected) < 1e-9  # type: ignore[attr-defined]


def test_arguments_are_checked() -> None:
    curv = _curvature("gauss_newton")
    with pytest.raises(
        ValueError, match=r"`rank=40` exceeds the number of chosen parameters \(39\)"
    ):
        LowRank(rank=40).factorize(curv, DAMPING)
    with pytest.raises(ValueError, match="damping > 0"):
        LowRank(rank=3).factorize(curv, 0.0)
    with pytest.raises(ValueError, match="`rank` must be a positive integer, got 0"):
        LowRank(rank=0)
    with pytest.raises(ValueError, match="`oversample`"):
        LowRank(oversample=-1)
    with pytest.raises(ValueError, match="`method` must be 'auto', 'nystrom' or 'lanczos'"):
        LowRank(method="arnoldi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`block_size`"):
        LowRank(block_size=0)
    with pytest.raises(ValueError, match="`max_examples`"):
        LowRank(max_examples=0)
    with pytest.raises(ValueError, match="`output_directions` must be a positive integer"):
        LowRank(output_directions=0)
    with pytest.raises(ValueError, match="`output_directions` must be a positive integer"):
        _curvature("gauss_newton", output_directions=0)


def test_max_examples_uses_a_subset_of_the_curvature(reference) -> None:
    curv = _curvature("gauss_newton")
    p = curv.n_params
    _, info = _exact_gn_lowrank(rank=p, method="lanczos", max_examples=25).factorize(curv, DAMPING)
    assert info["examples"] == 25
    # The subset curvature is a different matrix: full rank reproduces its exact inverse.
    model, data = _tiny()
    # 25 consecutive examples (wrapping around) of one random order of the dataset indices
    # (seed 0), from a start LowRank draws with seed + 1
    order = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    start = int(torch.randint(60, (1,), generator=torch.Generator().manual_seed(1)))
    subset = order[(start + torch.arange(25)) % 60].sort().values
    sub = reference.gauss_newton(model, data.tensors[0][subset])
    v = torch.randn(3, p, dtype=torch.float64)
    low, _ = _exact_gn_lowrank(rank=p, method="lanczos", max_examples=25).solve(curv, v, DAMPING)
    assert _rel(low, v @ reference.inverse(sub, DAMPING)) < 1e-9


def test_output_directions_truncate_each_output_hessian(reference) -> None:
    v = torch.randn(4, 39, dtype=torch.float64)
    truncated = _curvature(batch_size=16, output_directions=1)
    expected = v @ _matrix(reference, "gauss_newton", directions=1)
    assert _rel(truncated.matvec(v), expected) < 1e-12
    kept = truncated.output_trace_kept
    assert kept is not None and 0.4 < kept < 1.0  # three classes: the top one carries part
    exact = v @ _matrix(reference, "gauss_newton")
    assert _rel(expected, exact) > 1e-2  # the truncation is a different matrix


def test_output_directions_one_below_the_classes_are_exact(reference) -> None:
    """A softmax output Hessian ``diag(p) - p p^T`` has rank ``k - 1``: keeping ``k - 1``
    directions is the exact Gauss-Newton matrix."""
    v = torch.randn(4, 39, dtype=torch.float64)
    truncated = _curvature(batch_size=16, output_directions=2)
    exact = v @ _matrix(reference, "gauss_newton")
    assert _rel(truncated.matvec(v), exact) < 1e-10
    assert _rel(v @ _matrix(reference, "gauss_newton", directions=2), exact) < 1e-10
    assert truncated.output_trace_kept == pytest.approx(1.0, abs=1e-12)


def test_lowrank_reports_the_output_trace_it_kept() -> None:
    curv = _curvature("gauss_newton")
    _, info = LowRank(rank=4, output_directions=1).factorize(curv, DAMPING)
    assert 0.4 < info["output_trace_kept"] < 1.0 and info["output_directions"] == 1
    _, info = LowRank(rank=4, output_directions=None).factorize(curv, DAMPING)
    assert "output_trace_kept" not in info
    _, info = LowRank(rank=4, method="lanczos").factorize(_curvature("hessian"), DAMPING)
    assert "output_trace_kept" not in info  # the Hessian is never truncated


def test_lowrank_warns_when_one_output_direction_is_not_enough() -> None:
    """A regressor with 8 outputs has an isotropic output Hessian: one direction keeps 1/8."""
    torch.manual_seed(0)
    model = nn.Linear(5, 8).double()
    data = TensorDataset(torch.randn(40, 5, dtype=torch.float64), torch.randn(40, 8).double())
    curv = _curvature(batch_size=40, model=model, data=data, task=RegressionTask())
    with pytest.warns(UserWarning, match=r"kept 12% of the output Hessians' trace"):
        _, info = LowRank(rank=4).factorize(curv, DAMPING)
    assert info["output_trace_kept"] == pytest.approx(1 / 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the exact products do not warn
        _, info = LowRank(rank=4, output_directions=None).factorize(curv, DAMPING)
    assert "output_trace_kept" not in info


def _influence(batch_size: int, **kwargs: object) -> torch.Tensor:
    model, data = _tiny()
    result = compute_influence(
        model,
        data,
        data,
        solver=Exact(),
        damping=DAMPING,
        batch_size=batch_size,
        curvature_batch_size=batch_size,
        self_influence_solver=LowRank(rank=4, oversample=4, block_size=4),
        progress=False,
        **kwargs,  # type: ignore[arg-type]
    )
    assert result.self_influence is not None
    return result.self_influence


def test_self_influence_is_the_same_for_any_batch_size() -> None:
    reference = _influence(60)
    for batch_size in (1, 7, 32):
        assert _rel(_influence(batch_size), reference) < 1e-10


def test_lowrank_scores_and_self_influence_equal_the_truncated_inverse(reference) -> None:
    """One factorization serves scores and self-influence; both match the inverse built from
    the top eigenpairs of the truncated Gauss-Newton matrix (one output direction, the default)."""
    model, data = _tiny()
    x, y = data.tensors
    rank, p = 10, 39
    # A complete Krylov space (rank + oversample = p): the Ritz pairs are the eigenpairs.
    solver = LowRank(rank=rank, oversample=p - rank, method="lanczos", block_size=2)
    val = list(range(0, 60, 5))
    result = compute_influence(
        model,
        data,
        as_indexed(data, val),
        solver=solver,
        damping=DAMPING,
        self_influence_solver=solver,
        progress=False,
    )
    assert result.self_influence is not None
    settings = result.settings["self_influence_solver"]
    assert settings["name"] == "lowrank" and settings["rank"] == rank
    assert result.diagnostics["self_influence_rank"] == rank
    inverse = _truncated_inverse(_matrix(reference, "gauss_newton", directions=1), rank, DAMPING)
    g = reference.gradients(model, x, y)
    assert _rel(result.scores, -g @ inverse @ g[val].T) < 1e-10
    assert _rel(result.self_influence, torch.einsum("ip,pq,iq->i", g, inverse, g)) < 1e-10
    assert bool((result.self_influence > 0).all())


@pytest.mark.slow
def test_scalable_self_influence_ranks_like_exact(digits, fit_lbfgs, reference) -> None:
    """A small digits MLP with 10% flipped labels: LowRank ranks like the exact inverse."""
    train, _ = digits(n_train=400)
    x, y = train.tensors
    gen = torch.Generator().manual_seed(0)
    flip = torch.randperm(400, generator=gen)[:40]
    y = y.clone()
    y[flip] = (y[flip] + torch.randint(1, 10, (40,), generator=gen)) % 10
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    fit_lbfgs(model, x, y, weight_decay=1e-2, max_iter=200)
    data = TensorDataset(x, y)
    fast = compute_influence(
        model,
        data,
        as_indexed(data, [0]),
        solver=Exact(),
        damping=1e-2,
        self_influence_solver=LowRank(),
        batch_size=400,
        progress=False,
    )
    assert fast.self_influence is not None
    g = reference.gradients(model, x, y)
    inverse = reference.inverse(reference.gauss_newton(model, x), 1e-2)
    exact = torch.einsum("ip,pq,iq->i", g, inverse, g)
    rho = spearmanr(fast.self_influence.numpy(), exact.numpy())[0]
    assert rho >= 0.99


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)

    def reduce(t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    try:
        shard = list(range(rank, 60, world))
        si = _influence(8, train_indices=shard, reduce=reduce)
        torch.save({"indices": torch.tensor(shard), "self_influence": si}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.ddp
def test_self_influence_under_two_processes_equals_one(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'store'}"
    # Forked workers skip re-importing torch and the package (most of a spawned worker's time).
    mp.start_processes(
        _ddp_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    reference = _influence(60)
    merged = torch.zeros(60, dtype=torch.float64)
    seen = torch.zeros(60, dtype=torch.bool)
    for rank in range(2):
        part = torch.load(tmp_path / f"rank{rank}.pt")
        merged[part["indices"]] = part["self_influence"]
        seen[part["indices"]] = True
    assert bool(seen.all())
    assert _rel(merged, reference) < 1e-9
