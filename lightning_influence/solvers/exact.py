"""``Exact``: the explicit curvature matrix and its eigendecomposition, for small models."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_influence.core.curvature import Curvature
from lightning_influence.solvers.base import Diagnostics, FactorizedSolver, InverseOperator

__all__ = ["Exact"]


@dataclass(frozen=True)
class Exact(FactorizedSolver):
    """The explicit curvature matrix and an eigendecomposition; for small parameter counts.

    Args:
        max_params: refuse models with more chosen parameters than this (the matrix is ``p x p``).

    Example:
        >>> Exact(max_params=2000).max_params
        2000
    """

    max_params: int = 6000
    name = "exact"

    def __post_init__(self) -> None:
        if self.max_params < 1:
            raise ValueError(f"`max_params` must be positive, got {self.max_params}.")

    def factorize(
        self, curvature: Curvature, damping: float, progress: bool = False
    ) -> tuple[InverseOperator, Diagnostics]:
        """Eigendecompose ``H + damping I``."""
        p = curvature.n_params
        if p > self.max_params:
            raise ValueError(
                f"Exact needs the full {p} x {p} curvature matrix, above `max_params="
                f"{self.max_params}`. Use `LiSSA()` or `CG()` for validation scores and "
                "`LowRank()` for self-influence, or select fewer parameters with `parameters=`."
            )
        mat = curvature.dense().double()  # the eigendecomposition in float64, whatever the dtype
        mat.diagonal().add_(damping)
        evals, evecs = torch.linalg.eigh(mat)
        if evals.abs().min() <= 1e-12 * evals.abs().max():
            raise ValueError(
                "H + damping I is singular; increase `damping` (it is "
                f"{damping:g}, smallest eigenvalue {evals.min().item():.3g})."
            )
        info = {
            "min_eigenvalue": float(evals.min()),
            "max_eigenvalue": float(evals.max()),
            "negative_eigenvalues": float((evals < 0).sum()),
        }

        def inverse(vectors: Tensor) -> Tensor:
            v = vectors.to(evecs.dtype)
            return (((v @ evecs) / evals) @ evecs.T).to(vectors.dtype)

        return inverse, info
