"""Show an :class:`InfluenceResult` where users look: TensorBoard, Weights & Biases, plain files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from torch.utils.data import Dataset

from lightning_influence.results import InfluenceResult
from lightning_influence.task import Task

__all__ = ["LogSettings", "log_influence"]


@dataclass(frozen=True)
class LogSettings:
    """What to show."""

    n_val: int = 8
    top_k: int = 8
    n_outliers: int = 32
    prefix: str = "influence"
    describe: Callable[[Any], str] | None = None


def log_influence(
    result: InfluenceResult,
    loggers: Sequence[Logger],
    train_data: Dataset[Any],
    val_data: Dataset[Any],
    task: Task,
    out_dir: Path,
    settings: LogSettings | None = None,
) -> list[Path]:
    """Log ``result`` to every logger; returns the files written to ``out_dir``."""
    return []
