"""Solvers: apply ``(H + damping I)^-1`` to a block of vectors, one module each."""

from lightning_influence.solvers.base import (
    FactorizedSolver,
    InverseOperator,
    Solver,
    SolverDivergedError,
)
from lightning_influence.solvers.cg import CG
from lightning_influence.solvers.ekfac import EKFAC, KroneckerInverse
from lightning_influence.solvers.exact import Exact
from lightning_influence.solvers.lissa import LiSSA
from lightning_influence.solvers.lowrank import LowRank, LowRankInverse

__all__ = [
    "CG",
    "EKFAC",
    "Exact",
    "FactorizedSolver",
    "InverseOperator",
    "KroneckerInverse",
    "LiSSA",
    "LowRank",
    "LowRankInverse",
    "Solver",
    "SolverDivergedError",
]
