"""Influence functions for PyTorch Lightning: which training examples made a model predict this?

Start with `compute_influence` or the `InfluenceCallback`.

Public names are imported when first used (PEP 562), so ``import lightning_influence`` stays
cheap: Lightning, the loggers and matplotlib load only with the parts that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_influence.lazy import lazy_attributes

if TYPE_CHECKING:
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
    from lightning_influence.report.settings import LogSettings
    from lightning_influence.result import InfluenceResult, Ranking
    from lightning_influence.solvers import CG, Exact, LiSSA, Solver, SolverDivergedError
    from lightning_influence.solvers.ekfac import EKFAC
    from lightning_influence.solvers.lowrank import LowRank

__version__ = "0.1.0.dev0"

_SOURCES: dict[str, str] = {
    "CG": "lightning_influence.solvers.cg",
    "ClassificationTask": "lightning_influence.core.task",
    "Curvature": "lightning_influence.core.curvature",
    "EKFAC": "lightning_influence.solvers.ekfac",
    "Exact": "lightning_influence.solvers.exact",
    "FunctionalModel": "lightning_influence.core.model",
    "IndexedData": "lightning_influence.core.data",
    "InfluenceCallback": "lightning_influence.callback.callback",
    "InfluenceConfig": "lightning_influence.config",
    "InfluenceError": "lightning_influence.errors",
    "InfluenceResult": "lightning_influence.result",
    "LanguageModelingTask": "lightning_influence.core.sequence",
    "LiSSA": "lightning_influence.solvers.lissa",
    "LogSettings": "lightning_influence.report.settings",
    "LowRank": "lightning_influence.solvers.lowrank",
    "Ranking": "lightning_influence.result",
    "RegressionTask": "lightning_influence.core.task",
    "SequenceClassificationTask": "lightning_influence.core.sequence",
    "Solver": "lightning_influence.solvers.base",
    "SolverDivergedError": "lightning_influence.solvers.base",
    "Task": "lightning_influence.core.task",
    "TaskError": "lightning_influence.core.task",
    "as_indexed": "lightning_influence.core.data",
    "completion_example": "lightning_influence.core.sequence",
    "compute_influence": "lightning_influence.compute",
    "detection_metrics": "lightning_influence.metrics",
    "influence_from_checkpoint": "lightning_influence.callback.checkpoint",
    "influence_on_parameters": "lightning_influence.compute",
    "perturbation_influence": "lightning_influence.core.scores",
    "select_parameters": "lightning_influence.core.model",
}
"""Where each public name lives; :func:`__getattr__` imports it from there on first use."""

__all__ = [
    "CG",
    "EKFAC",
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


__getattr__ = lazy_attributes(__name__, _SOURCES)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
