"""``Exact``: the explicit curvature matrix and its eigendecomposition, for small models."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_influence.solvers.base import CurvatureOperator, Diagnostics, FactorizedSolver

__all__ = ["DenseInverse", "Exact"]


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
        self, curvature: CurvatureOperator, damping: float, progress: bool = False
    ) -> tuple[DenseInverse, Diagnostics]:
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
        return DenseInverse(evecs, evals), info


class DenseInverse:
    """``(H + damping I)^-1`` from its full eigendecomposition: eigenvectors as columns of
    ``evecs`` ``[p, p]`` and the eigenvalues ``evals`` of ``H + damping I``.

    Example:
        >>> import torch
        >>> inverse = DenseInverse(torch.eye(2), torch.tensor([2.0, 4.0]))
        >>> inverse(torch.ones(1, 2)), inverse.quadratic(torch.ones(1, 2))
        (tensor([[0.5000, 0.2500]]), tensor([0.7500]))
    """

    def __init__(self, evecs: Tensor, evals: Tensor) -> None:
        self.evecs, self.evals = evecs, evals

    def __call__(self, vectors: Tensor) -> Tensor:
        v = vectors.to(self.evecs.dtype)
        return (((v @ self.evecs) / self.evals) @ self.evecs.T).to(vectors.dtype)

    def quadratic(self, vectors: Tensor) -> Tensor:
        """``v^T (H + damping I)^-1 v`` for each row ``v``."""
        projected = vectors.to(self.evecs.dtype) @ self.evecs
        return (projected.square() / self.evals).sum(1).to(vectors.dtype)
