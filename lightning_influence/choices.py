"""The choices made before a solve: which curvature (``curvature="auto"`` measures it) and which
factorization gives self-influence.
"""

from __future__ import annotations

import torch

from lightning_influence.core.collective import Reduce
from lightning_influence.core.curvature import Curvature, CurvatureChoice
from lightning_influence.core.data import IndexedData
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.products import hessian_available
from lightning_influence.solvers import EKFAC, Exact, FactorizedSolver, LiSSA, Solver
from lightning_influence.solvers.definiteness import smallest_eigenvalue
from lightning_influence.solvers.preconditioner import PRECONDITIONER

__all__ = ["choose_curvature", "default_self_influence_solver"]


def default_self_influence_solver(n_params: int, solver: Solver | None = None) -> FactorizedSolver:
    """``Exact()`` for up to 512 parameters (cheap and exact), else an ``Exact`` or ``EKFAC``
    ``solver`` itself or the preconditioner of a preconditioned ``LiSSA`` ``solver`` (one
    factorization serves both), else the factorization ``LiSSA()`` preconditions with
    (``PRECONDITIONER``), so that self-influence does not depend on the iterative solver.

    Relative influence divides by the square root of self-influence, so its size matters, not
    only its order: where the scores come from an exact inverse, so does self-influence.

    Example:
        >>> default_self_influence_solver(100).name, default_self_influence_solver(10_000).name
        ('exact', 'lowrank')
        >>> from lightning_influence import CG
        >>> default_self_influence_solver(10_000, CG()) is PRECONDITIONER
        True
        >>> solver = Exact()
        >>> default_self_influence_solver(10_000, solver) is solver
        True
    """
    if n_params <= 512:
        return Exact()
    if isinstance(solver, Exact | EKFAC):
        return solver
    if isinstance(solver, LiSSA) and solver.preconditioner is not None:
        return solver.preconditioner
    return PRECONDITIONER


def choose_curvature(
    model: FunctionalModel,
    data: IndexedData,
    choice: CurvatureChoice,
    damping: float,
    reduce: Reduce | None = None,
    seed: int = 0,
) -> tuple[Curvature, dict[str, float]]:
    """The curvature to solve with, and what was measured to choose it.

    ``"gauss_newton"`` and ``"hessian"`` are taken as they are. ``"auto"`` measures the smallest
    eigenvalue of the Hessian (``solvers.definiteness.smallest_eigenvalue``: Lanczos on all the
    data, stopped once ``H + damping I`` is shown indefinite) and takes the Hessian where
    ``H + damping I`` is positive definite, Gauss-Newton otherwise (and where the model has no
    second derivative, such as ``nn.EmbeddingBag``). The
    diagnostics: ``curvature_hessian`` (1 or 0), ``curvature_smallest_eigenvalue`` (of ``H``,
    without the damping) and ``curvature_check_products``.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence.core.data import as_indexed
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(3, 2), ClassificationTask())
        >>> data = as_indexed(TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,))))
        >>> curv, info = choose_curvature(fm, data, "auto", damping=0.1)
        >>> curv.kind, info["curvature_hessian"]  # a linear model: convex
        ('hessian', 1.0)
    """
    if choice != "auto":
        return Curvature(model, data, choice, reduce), {}
    if not _hessian_everywhere(model, data, reduce):  # a layer without a second derivative
        return Curvature(model, data, "gauss_newton", reduce), {"curvature_hessian": 0.0}
    hessian = Curvature(model, data, "hessian", reduce)
    smallest, products = smallest_eigenvalue(hessian, below=-damping, seed=seed)
    definite = smallest + damping > 0
    info = {
        "curvature_hessian": float(definite),
        "curvature_smallest_eigenvalue": smallest,
        "curvature_check_products": float(products),
    }
    return (hessian if definite else Curvature(model, data, "gauss_newton", reduce)), info


def _hessian_everywhere(model: FunctionalModel, data: IndexedData, reduce: Reduce | None) -> bool:
    """Whether every process can compute Hessian products (one on its first example; the same
    answer on all processes, summed across them)."""
    missing = 0.0
    if len(data):
        first = model.prepare(data.fetch(data.indices[:1]))
        missing = float(not hessian_available(model, first.inputs, first.targets))
    if reduce is not None:
        missing = float(reduce(torch.tensor([missing], device=model.device)).item())
    return missing == 0
