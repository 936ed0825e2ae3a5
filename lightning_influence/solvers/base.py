"""The solver interface: apply ``(H + damping I)^-1`` to a block of vectors.

Every solver consumes the same curvature products and treats the rows of a block ``[m, p]`` as
independent right-hand sides that move together, so one curvature product serves all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from lightning_influence.core.operators import CurvatureOperator, InverseOperator

__all__ = [
    "CurvatureOperator",
    "FactorizedSolver",
    "InverseOperator",
    "Solver",
    "SolverDivergedError",
]

Diagnostics = dict[str, float]


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
