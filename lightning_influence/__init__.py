"""Influence functions for PyTorch Lightning: which training examples made a model predict this?

Start with `compute_influence` or the `InfluenceCallback`.
"""

from lightning_influence.callback import (
    InfluenceCallback,
    InfluenceError,
    influence_from_checkpoint,
)
from lightning_influence.compute import compute_influence, influence_on_parameters
from lightning_influence.config import InfluenceConfig
from lightning_influence.core.curvature import Curvature
from lightning_influence.core.data import IndexedData, as_indexed
from lightning_influence.core.model import FunctionalModel, select_parameters
from lightning_influence.core.scores import perturbation_influence
from lightning_influence.core.sequence import (
    LanguageModelingTask,
    SequenceClassificationTask,
    completion_example,
)
from lightning_influence.core.task import ClassificationTask, RegressionTask, Task, TaskError
from lightning_influence.metrics import detection_metrics
from lightning_influence.report import LogSettings
from lightning_influence.result import InfluenceResult, Ranking
from lightning_influence.solvers import CG, Exact, LiSSA, Solver, SolverDivergedError
from lightning_influence.solvers.lowrank import LowRank

__version__ = "0.1.0.dev0"

__all__ = [
    "CG",
    "ClassificationTask",
    "Curvature",
    "Exact",
    "FunctionalModel",
    "IndexedData",
    "InfluenceCallback",
    "InfluenceConfig",
    "InfluenceError",
    "InfluenceResult",
    "LanguageModelingTask",
    "LiSSA",
    "LogSettings",
    "LowRank",
    "Ranking",
    "RegressionTask",
    "SequenceClassificationTask",
    "Solver",
    "SolverDivergedError",
    "Task",
    "TaskError",
    "__version__",
    "as_indexed",
    "completion_example",
    "compute_influence",
    "detection_metrics",
    "influence_from_checkpoint",
    "influence_on_parameters",
    "perturbation_influence",
    "select_parameters",
]
