"""``compute_influence``: the whole pipeline in one call, without a Trainer.

dataloaders -> per-sample gradients -> validation inverse-HVPs -> scores -> InfluenceResult.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_influence.core.curvature import Curvature, CurvatureKind
from lightning_influence.core.data import IndexedData, as_indexed
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.scores import example_pass, perturbation_influence
from lightning_influence.core.task import ClassificationTask, Task
from lightning_influence.result import InfluenceResult
from lightning_influence.solvers import Exact, FactorizedSolver, LiSSA, Solver
from lightning_influence.solvers.lowrank import LowRank

__all__ = [
    "compute_influence",
    "default_self_influence_solver",
    "evaluation_mode",
    "influence_on_parameters",
]

Data = Dataset[Any] | DataLoader[Any] | IndexedData
CURVATURE_BATCH = 256


def default_self_influence_solver(n_params: int) -> FactorizedSolver:
    """``Exact()`` for up to 512 parameters (cheap and exact), else ``LowRank()``.

    Example:
        >>> default_self_influence_solver(100).name, default_self_influence_solver(10_000).name
        ('exact', 'lowrank')
    """
    return Exact() if n_params <= 512 else LowRank()


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode (BatchNorm running statistics, no dropout) for the block; each submodule's
    own mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def compute_influence(
    model: nn.Module,
    train_data: Data,
    val_data: Data,
    *,
    solver: Solver | None = None,
    damping: float = 1e-3,
    task: Task | None = None,
    parameters: Sequence[str] | None = None,
    curvature: CurvatureKind = "gauss_newton",
    self_influence: bool = True,
    self_influence_solver: FactorizedSolver | None = None,
    train_indices: Sequence[int] | Tensor | None = None,
    val_indices: Sequence[int] | Tensor | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    perturbation_k: int = 0,
    progress: bool = True,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> InfluenceResult:
    """Influence of every training example on each validation example.

    Args:
        model: the trained model, on the device to compute on; it is not modified.
        train_data: training ``Dataset`` or ``DataLoader`` (its dataset and collate function are
            used; never its sampler, so scores carry dataset indices).
        val_data: validation ``Dataset`` or ``DataLoader``.
        solver: applies ``(H + damping I)^-1`` to the validation gradients; ``LiSSA()`` by default.
        damping: the ``lambda`` of ``H + lambda I``; pass the weight decay the model was trained
            with to reproduce its objective's curvature exactly.
        task: how a batch becomes per-sample losses; ``ClassificationTask()`` by default.
        parameters: shell-style name patterns of the parameters to use (all trainable by default).
        curvature: ``"gauss_newton"`` (positive semi-definite, the default) or ``"hessian"``.
        self_influence: also compute ``g_i^T (H + damping I)^-1 g_i`` for every training example.
        self_influence_solver: a solver that factorizes once; by default ``LowRank()`` (top
            eigenpairs of the curvature, damping on the rest), or ``Exact()`` for models with at
            most 512 chosen parameters.
        train_indices: dataset indices of the training examples to score (all by default). The
            curvature is always that of these examples (summed over processes with ``reduce``).
        val_indices: dataset indices of the validation examples (all by default).
        batch_size: examples per batch for gradients and curvature (the loader's, else 64).
        dtype: working precision; the model's own by default (``torch.float64`` for references).
        perturbation_k: for each validation point, compute ``I_pert,loss`` (a saliency map over
            the input) for its ``k`` most helpful and ``k`` most harmful training examples.
        progress: show progress bars.
        reduce: sums a tensor across processes under data parallelism (each process passes its
            own shard as ``train_indices``); ``None`` on one process.

    Returns:
        An :class:`InfluenceResult`; ``scores[i, j]`` is positive when training example ``i``
        harms validation example ``j``.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence import Exact
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
        >>> model = torch.nn.Linear(3, 2)
        >>> result = compute_influence(model, TensorDataset(x[:30], y[:30]),
        ...                            TensorDataset(x[30:], y[30:]), damping=0.1,
        ...                            solver=Exact(), progress=False)
        >>> result.scores.shape, result.self_influence.shape
        (torch.Size([30, 10]), torch.Size([30]))
    """
    if damping < 0:
        raise ValueError(f"`damping` must be non-negative, got {damping}.")
    with evaluation_mode(model):
        return _compute(
            model, train_data, val_data, solver or LiSSA(), damping, task or ClassificationTask(),
            parameters, curvature, self_influence, self_influence_solver, train_indices,
            val_indices, batch_size, dtype, perturbation_k, progress, reduce,
        )  # fmt: skip


def _compute(
    model: nn.Module,
    train_data: Data,
    val_data: Data,
    solver: Solver,
    damping: float,
    task: Task,
    parameters: Sequence[str] | None,
    curvature: CurvatureKind,
    self_influence: bool,
    self_influence_solver: FactorizedSolver | None,
    train_indices: Sequence[int] | Tensor | None,
    val_indices: Sequence[int] | Tensor | None,
    batch_size: int | None,
    dtype: torch.dtype | None,
    perturbation_k: int,
    progress: bool,
    reduce: Callable[[Tensor], Tensor] | None,
) -> InfluenceResult:
    started = time.perf_counter()
    fm = FunctionalModel(model, task, parameters, dtype)
    train = as_indexed(train_data, train_indices, batch_size)
    val = as_indexed(val_data, val_indices, batch_size)
    if len(val) == 0:
        raise ValueError(
            "The validation data is empty: pass a non-empty `val_data` (or `val_indices`)."
        )
    # Full passes over the curvature data (CG, Exact, LowRank) run faster in larger batches.
    curv = Curvature(fm, train.rebatched(max(train.batch_size, CURVATURE_BATCH)), curvature, reduce)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    val_pass = example_pass(fm, val, keep_gradients=True, progress=progress, desc="Validation")
    assert val_pass.gradients is not None
    timings["time_val_gradients"] = time.perf_counter() - t0

    si_solver = self_influence_solver or default_self_influence_solver(fm.n_params)
    inverse: Callable[[Tensor], Tensor] | None = None
    self_info: dict[str, float] = {}
    t0 = time.perf_counter()
    if isinstance(solver, FactorizedSolver):
        factorized, solver_info = solver.factorize(curv, damping, progress)
        val_inverse = factorized(val_pass.gradients)
        if self_influence and si_solver == solver:  # one factorization serves both
            inverse, self_info = factorized, solver_info
    else:
        val_inverse, solver_info = solver.solve(curv, val_pass.gradients, damping, progress)
    timings["time_solver"] = time.perf_counter() - t0

    if self_influence and inverse is None:
        t0 = time.perf_counter()
        inverse, self_info = si_solver.factorize(curv, damping, progress)
        timings["time_self_influence_factorize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_pass = example_pass(fm, train, val_inverse, inverse, progress=progress, desc="Training")
    timings["time_scoring"] = time.perf_counter() - t0

    perturbation = perturbation_indices = None
    if perturbation_k > 0 and train_pass.scores is not None:
        t0 = time.perf_counter()
        perturbation, perturbation_indices = _perturbations(
            fm, train, train_pass.indices, train_pass.scores, val_inverse, perturbation_k
        )
        timings["time_perturbation"] = time.perf_counter() - t0
    timings["time_total"] = time.perf_counter() - started

    diagnostics = {
        **{f"solver_{k}": v for k, v in solver_info.items()},
        **{f"self_influence_{k}": v for k, v in self_info.items()},
        **timings,
    }
    settings = {
        "solver": solver.settings(),
        "self_influence_solver": si_solver.settings() if self_influence else None,
        "curvature": curvature,
        "parameters": fm.names,
        "n_params": fm.n_params,
        "n_train_total": curv.n_total,
        "dtype": str(fm.dtype),
        "task": type(task).__name__,
    }
    return InfluenceResult(
        scores=train_pass.scores if train_pass.scores is not None else torch.zeros(0, 0),
        train_indices=train_pass.indices,
        val_indices=val_pass.indices,
        self_influence=train_pass.self_influence,
        train_losses=train_pass.losses,
        train_targets=train_pass.targets,
        train_predictions=train_pass.predictions,
        val_losses=val_pass.losses,
        val_targets=val_pass.targets,
        val_predictions=val_pass.predictions,
        perturbation=perturbation,
        perturbation_indices=perturbation_indices,
        damping=float(damping),
        settings=settings,
        diagnostics=diagnostics,
    )


def _perturbations(
    fm: FunctionalModel,
    train: IndexedData,
    indices: Tensor,
    scores: Tensor,
    val_inverse: Tensor,
    k: int,
) -> tuple[Tensor, Tensor]:
    """``I_pert,loss`` maps for each validation point's top-k helpful and harmful examples."""
    k = min(k, scores.shape[0])
    pick = torch.cat(
        [torch.topk(scores.T, k, largest=False).indices, torch.topk(scores.T, k).indices], dim=1
    )  # [n_val, 2k] positions into the training rows
    maps = []
    for j in range(pick.shape[0]):
        batch = train.fetch(indices[pick[j]])
        maps.append(perturbation_influence(fm, batch, val_inverse[j : j + 1])[:, 0].cpu())
    return torch.stack(maps), indices[pick]


def influence_on_parameters(
    model: nn.Module,
    train_data: Data,
    indices: Sequence[int] | Tensor,
    *,
    solver: Solver | None = None,
    damping: float = 1e-3,
    task: Task | None = None,
    parameters: Sequence[str] | None = None,
    curvature: CurvatureKind = "gauss_newton",
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``I_up,params(z) = -(H + damping I)^-1 g(z)`` for the training examples at ``indices``.

    Returns ``[len(indices), p]``: the first-order change of the chosen (flattened) parameters per
    unit of upweighting; removing example ``z`` changes them by about ``-1/n`` times this.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence import Exact
        >>> data = TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
        >>> influence_on_parameters(torch.nn.Linear(3, 2), data, [0, 5], solver=Exact(),
        ...                         damping=0.1).shape
        torch.Size([2, 8])
    """
    task = task or ClassificationTask()
    with evaluation_mode(model):
        fm = FunctionalModel(model, task, parameters, dtype)
        train = as_indexed(train_data, None, batch_size)
        chosen = example_pass(fm, as_indexed(train, indices), keep_gradients=True)
        assert chosen.gradients is not None
        curv = Curvature(fm, train, curvature)
        solved, _ = (solver or LiSSA()).solve(curv, chosen.gradients, damping)
    return -solved
