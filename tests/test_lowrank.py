"""LowRank against Exact and against the analytic truncated inverse; streamed self-influence."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import digits, fit_lbfgs
from scipy.stats import spearmanr
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_influence import Exact, LowRank, compute_influence
from lightning_influence.core.curvature import Curvature, CurvatureKind
from lightning_influence.core.data import as_indexed
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.task import ClassificationTask, RegressionTask

DAMPING = 0.05


def _tiny() -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()  # 39 parameters
    x = torch.randn(60, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (60,))
    return model, TensorDataset(x, y)


def _curvature(kind: CurvatureKind, batch_size: int = 60) -> Curvature:
    model, data = _tiny()
    fm = FunctionalModel(model, ClassificationTask())
    return Curvature(fm, as_indexed(data, batch_size=batch_size), kind)


def _exact_gn_lowrank(**kwargs: object) -> LowRank:
    """``LowRank`` on the exact Gauss-Newton products, for comparisons with ``Exact``."""
    return LowRank(output_directions=None, **kwargs)  # type: ignore[arg-type]


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", ["gauss_newton", "hessian"])
@pytest.mark.parametrize("block_size", [1, 4])
def test_full_rank_equals_exact(kind: CurvatureKind, block_size: int) -> None:
    curv = _curvature(kind)
    p = curv.n_params
    v = torch.randn(7, p, dtype=torch.float64)
    exact, _ = Exact().solve(curv, v, DAMPING)
    low, info = _exact_gn_lowrank(rank=p, method="lanczos", block_size=block_size).solve(
        curv, v, DAMPING
    )
    assert _rel(low, exact) < 1e-9
    assert info["rank"] == p and info["matvecs"] == p
    assert info["curvature_passes"] == -(-p // block_size)
    if kind == "hessian":  # the tiny network's Hessian is indefinite; all of it is kept
        assert info["min_eigenvalue"] < 0


@pytest.mark.parametrize("kind", ["gauss_newton", "hessian"])
def test_small_rank_equals_truncated_inverse(kind: CurvatureKind) -> None:
    curv = _curvature(kind)
    p, rank = curv.n_params, 6
    evals, evecs = torch.linalg.eigh(curv.dense().double())
    top_e, top_u = evals[-rank:], evecs[:, -rank:]
    v = torch.randn(5, p, dtype=torch.float64)
    reference = v / DAMPING + ((v @ top_u) * (1 / (top_e + DAMPING) - 1 / DAMPING)) @ top_u.T
    # A complete Krylov space: the Ritz pairs are the eigenpairs.
    solver = _exact_gn_lowrank(rank=rank, oversample=p - rank, method="lanczos")
    low, info = solver.solve(curv, v, DAMPING)
    assert _rel(low, reference) < 1e-10
    assert info["max_eigenvalue"] == pytest.approx(float(evals[-1]), rel=1e-10)
    assert info["min_eigenvalue"] == pytest.approx(float(evals[-rank]), rel=1e-10)
    if kind == "gauss_newton":
        # Nystrom from a complete random basis is the matrix itself (up to its tiny shift).
        solver = _exact_gn_lowrank(rank=rank, oversample=p - rank, method="nystrom")
        low, info = solver.solve(curv, v, DAMPING)
        assert _rel(low, reference) < 1e-8
        assert info["curvature_passes"] == 1 and info["matvecs"] == p
    else:
        with pytest.raises(ValueError, match="positive semi-definite"):
            _exact_gn_lowrank(rank=rank, method="nystrom").solve(curv, v, DAMPING)
        # The default picks block Lanczos for the Hessian: 2 passes, complete at this size.
        low, info = _exact_gn_lowrank(rank=rank, oversample=p - rank).solve(curv, v, DAMPING)
        assert info["curvature_passes"] == 2
        assert _rel(low, reference) < 1e-9


def test_default_oversampling_finds_the_top_eigenpairs() -> None:
    # Logistic regression on digits: a convex model with a decaying Gauss-Newton spectrum.
    train, _ = digits(n_train=300)
    model = fit_lbfgs(nn.Linear(64, 10).double(), *train.tensors, weight_decay=1e-2, max_iter=100)
    fm = FunctionalModel(model, ClassificationTask())
    curv = Curvature(fm, as_indexed(train, batch_size=300))
    evals = torch.linalg.eigvalsh(curv.dense())
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


def test_quadratic_form_equals_the_inverse() -> None:
    curv = _curvature("gauss_newton")
    inverse, _ = LowRank(rank=6).factorize(curv, DAMPING)
    v = torch.randn(9, curv.n_params, dtype=torch.float64)
    assert _rel(inverse.quadratic(v), (v * inverse(v)).sum(1)) < 1e-12  # type: ignore[attr-defined]


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
        Curvature(curv.model, curv.data, output_directions=0)


def test_max_examples_uses_a_subset_of_the_curvature() -> None:
    curv = _curvature("gauss_newton")
    p = curv.n_params
    _, info = _exact_gn_lowrank(rank=p, method="lanczos", max_examples=25).factorize(curv, DAMPING)
    assert info["examples"] == 25
    # The subset curvature is a different matrix: full rank reproduces its exact inverse.
    model, data = _tiny()
    gen = torch.Generator().manual_seed(0)
    subset = torch.randperm(60, generator=gen)[:25].sort().values
    fm = FunctionalModel(model, ClassificationTask())
    sub = Curvature(fm, as_indexed(data, subset, batch_size=16))
    v = torch.randn(3, p, dtype=torch.float64)
    low, _ = _exact_gn_lowrank(rank=p, method="lanczos", max_examples=25).solve(curv, v, DAMPING)
    assert _rel(low, Exact().solve(sub, v, DAMPING)[0]) < 1e-9


def _truncated_reference(directions: int) -> tuple[Curvature, Tensor, Tensor]:
    """Gauss-Newton from the top ``directions`` eigenpairs of each output Hessian, built from
    dense per-example Jacobians; returns the truncating curvature, vectors and reference."""
    model, data = _tiny()
    fm = FunctionalModel(model, ClassificationTask())
    x, _ = data.tensors
    theta = fm.theta.detach()
    jac = torch.func.jacrev(lambda th: fm.outputs(th, x))(theta)  # [n, k, p]
    prob = fm.outputs(theta, x).softmax(1).detach()
    h_out = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    evals, evecs = torch.linalg.eigh(h_out)
    top = evecs[:, :, -directions:] * evals[:, None, -directions:].clamp_min(0).sqrt()
    rows = torch.einsum("nkp,nks->nsp", jac, top).reshape(-1, fm.n_params)
    v = torch.randn(4, fm.n_params, dtype=torch.float64)
    reference = (v @ rows.T) @ rows / len(x)
    curv = Curvature(fm, as_indexed(data, batch_size=16), output_directions=directions)
    return curv, v, reference


def test_output_directions_truncate_each_output_hessian() -> None:
    curv, v, reference = _truncated_reference(1)
    assert _rel(curv.matvec(v), reference) < 1e-12
    kept = curv.output_trace_kept
    assert kept is not None and 0.4 < kept < 1.0  # three classes: the top one carries part
    exact = _curvature("gauss_newton").matvec(v)
    assert _rel(reference, exact) > 1e-2  # the truncation is a different matrix


def test_output_directions_one_below_the_classes_are_exact() -> None:
    """A softmax output Hessian ``diag(p) - p p^T`` has rank ``k - 1``: keeping ``k - 1``
    directions is the exact Gauss-Newton matrix."""
    curv, v, reference = _truncated_reference(2)
    exact = _curvature("gauss_newton").matvec(v)
    assert _rel(curv.matvec(v), exact) < 1e-10
    assert _rel(reference, exact) < 1e-10
    assert curv.output_trace_kept == pytest.approx(1.0, abs=1e-12)


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
    curv = Curvature(FunctionalModel(model, RegressionTask()), as_indexed(data, batch_size=40))
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


def test_self_influence_matches_the_diagonal_of_lowrank_scores() -> None:
    model, data = _tiny()
    solver = LowRank(rank=10, method="lanczos", block_size=2)
    result = compute_influence(
        model,
        data,
        as_indexed(data, list(range(0, 60, 5))),
        solver=solver,
        damping=DAMPING,
        self_influence_solver=solver,
        progress=False,
    )
    assert result.self_influence is not None
    settings = result.settings["self_influence_solver"]
    assert settings["name"] == "lowrank" and settings["rank"] == 10
    assert result.diagnostics["self_influence_rank"] == 10
    diagonal = -result.scores[torch.arange(0, 60, 5), torch.arange(12)]
    assert _rel(diagonal, result.self_influence[::5]) < 1e-10
    assert bool((result.self_influence > 0).all())


@pytest.mark.slow
def test_scalable_self_influence_ranks_like_exact() -> None:
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
    kwargs = {"damping": 1e-2, "solver": Exact(), "progress": False, "batch_size": 400}
    exact = compute_influence(model, data, as_indexed(data, [0]), **kwargs)  # type: ignore[arg-type]
    fast = compute_influence(
        model,
        data,
        as_indexed(data, [0]),
        self_influence_solver=LowRank(),
        **kwargs,  # type: ignore[arg-type]
    )
    assert exact.self_influence is not None and fast.self_influence is not None
    rho = spearmanr(fast.self_influence.numpy(), exact.self_influence.numpy())[0]
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
