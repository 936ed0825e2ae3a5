"""Influence functions for PyTorch Lightning: which training examples made a model predict this?

Start with `compute_influence` or the `InfluenceCallback`.
"""

from lightning_influence.api import compute_influence, influence_on_parameters
from lightning_influence.callback import (
    InfluenceCallback,
    InfluenceError,
    influence_from_checkpoint,
)
from lightning_influence.data import IndexedData, as_indexed
from lightning_influence.hvp import Curvature
from lightning_influence.lowrank import LowRank
from lightning_influence.metrics import detection_metrics
from lightning_influence.params import FunctionalModel, select_parameters
from lightning_influence.results import InfluenceResult, Ranking
from lightning_influence.scores import perturbation_influence
from lightning_influence.solvers import CG, Exact, LiSSA, Solver, SolverDivergedError
from lightning_influence.task import ClassificationTask, RegressionTask, Task, TaskError

__version__ = "0.1.0.dev0"

__all__ = [
    "CG",
    "ClassificationTask",
    "Curvature",
    "Exact",
    "FunctionalModel",
    "IndexedData",
    "InfluenceCallback",
    "InfluenceError",
    "InfluenceResult",
    "LiSSA",
    "LowRank",
    "Ranking",
    "RegressionTask",
    "Solver",
    "SolverDivergedError",
    "Task",
    "TaskError",
    "__version__",
    "as_indexed",
    "compute_influence",
    "detection_metrics",
    "influence_from_checkpoint",
    "influence_on_parameters",
    "perturbation_influence",
    "select_parameters",
]
