"""The solver interface: apply ``(H + damping I)^-1`` to a block of vectors.

Every solver consumes the same curvature products and treats the rows of a block ``[m, p]`` as
independent right-hand sides that move together, so one curvature product serves all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "CurvatureOperator",
    "FactorizedSolver",
    "InverseOperator",
    "Solver",
    "SolverDivergedError",
]

Diagnostics = dict[str, float]


class CurvatureOperator(Protocol):
    """What a solver may ask of the curvature of the mean training loss: products, nothing else.

    Solvers never see datasets or the model. :class:`~lightning_influence.Curvature` is the
    implementation; a test can pass any object with these members (a dense matrix, say).
    """

    @property
    def n_params(self) -> int:
        """Dimension ``p`` of the parameter space."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """Working precision of the products."""
        ...

    @property
    def device(self) -> torch.device:
        """Device of the products."""
        ...

    @property
    def positive_semidefinite(self) -> bool:
        """True for the Gauss-Newton matrix; False for the Hessian, which may be indefinite."""
        ...

    @property
    def n_total(self) -> int:
        """Training examples the curvature averages over (summed over processes)."""
        ...

    @property
    def output_trace_kept(self) -> float | None:
        """Share of the output Hessians' trace kept by truncated Gauss-Newton products so far."""
        ...

    @property
    def output_trace_uniform(self) -> float | None:
        """The share the kept directions would carry if all output directions weighed the same."""
        ...

    def matvec(self, vectors: Tensor) -> Tensor:
        """Curvature on all training data applied to each row of ``vectors`` ``[m, p]``."""
        ...

    def minibatch(self, batch_size: int, generator: torch.Generator) -> Callable[[Tensor], Tensor]:
        """Products with the curvature of one random minibatch (pooled over processes)."""
        ...

    def subsample(
        self, max_examples: int | None, output_directions: int | None, generator: torch.Generator
    ) -> CurvatureOperator:
        """A cheaper estimate: at most ``max_examples`` examples per process, and for the
        Gauss-Newton matrix only the top ``output_directions`` output-Hessian directions."""
        ...

    def dense(self) -> Tensor:
        """The whole ``[p, p]`` matrix (small models only)."""
        ...


class InverseOperator(Protocol):
    """``(H + damping I)^-1`` as an operator on blocks of vectors ``[m, p]``."""

    def __call__(self, vectors: Tensor) -> Tensor:
        """The inverse applied to each row."""
        ...

    def quadratic(self, vectors: Tensor) -> Tensor:
        """``v^T (H + damping I)^-1 v`` for each row ``v`` (self-influence), ``[m]``."""
        ...


class SolverDivergedError(RuntimeError):
    """The solver produced NaN/Inf or grew without bound."""


class Solver(ABC):
    """Applies ``(H + damping I)^-1`` to each row of a block ``[m, p]``."""

    name: str = "solver"

    @abstractmethod
    def solve(
        self, curvature: CurvatureOperator, vectors: Tensor, damping: float, progress: bool = False
    ) -> tuple[Tensor, Diagnostics]:
        """Return ``(H + damping I)^-1`` applied to each row of ``vectors``, and diagnostics."""

    def settings(self) -> dict[str, Any]:
        """The solver's settings, JSON-serialisable."""
        values = asdict(self) if hasattr(self, "__dataclass_fields__") else {}  # type: ignore[call-overload]
        return {"name": self.name, **values}


class FactorizedSolver(Solver):
    """A solver that builds the inverse once and applies it to any number of vectors."""

    @abstractmethod
    def factorize(
        self, curvature: CurvatureOperator, damping: float, progress: bool = False
    ) -> tuple[InverseOperator, Diagnostics]:
        """The inverse as a function of a block of vectors, and diagnostics."""

    def solve(
        self, curvature: CurvatureOperator, vectors: Tensor, damping: float, progress: bool = False
    ) -> tuple[Tensor, Diagnostics]:
        """Factorize, then apply to ``vectors``."""
        inverse, info = self.factorize(curvature, damping, progress)
        return inverse(vectors), info


def check_finite(t: Tensor, solver: str, damping: float, scale: float | None) -> None:
    """Raise :class:`SolverDivergedError` when ``t`` holds NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        raise_diverged(solver, damping, scale, "produced NaN or Inf")


def raise_diverged(solver: str, damping: float, scale: float | None, what: str) -> None:
    """Raise :class:`SolverDivergedError` naming ``scale`` and ``damping`` as the knobs."""
    hint = f"increase `scale` (it is {scale:g}) or " if scale is not None else ""
    raise SolverDivergedError(
        f"{solver} {what}. The curvature may be larger than the solver assumed or H + damping I "
        f"may not be positive definite: {hint}increase `damping` (it is {damping:g}), "
        "or use curvature='gauss_newton', which is positive semi-definite."
    )
