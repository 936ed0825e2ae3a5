"""Log a report to every logger: one writer per logger type, plain files for the rest."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from lightning_influence.core.task import Task
from lightning_influence.report.dashboard import write_dashboard
from lightning_influence.report.files import write_files, write_tables
from lightning_influence.report.model import Report, build_report, draw_figures
from lightning_influence.report.raster import PngWriter
from lightning_influence.report.settings import LogSettings
from lightning_influence.report.tensorboard import write_tensorboard
from lightning_influence.report.wandb import write_wandb
from lightning_influence.result import InfluenceResult

__all__ = ["WRITERS", "log_influence"]

Writer = Callable[[Any, Report, str, int, "Path | None"], None]
"""Writes a report to one logger: ``(logger, report, prefix, step, result_path)``."""

WRITERS: dict[type[Logger], Writer] = {
    TensorBoardLogger: write_tensorboard,
    WandbLogger: write_wandb,
}
"""The logger types with panels of their own (subclasses included), and their writers."""


def log_influence(
    result: InfluenceResult,
    loggers: Sequence[Logger],
    train_data: Dataset[Any] | DataLoader[Any],
    val_data: Dataset[Any] | DataLoader[Any],
    task: Task,
    out_dir: Path,
    settings: LogSettings | None = None,
    result_path: Path | None = None,
    step: int = 0,
) -> list[Path]:
    """Log ``result`` to every logger and write the review files; returns the files written.

    Call it on rank zero only (it does nothing elsewhere). ``train_data`` and ``val_data`` are
    the datasets the result's dataset indices refer to; ``task`` unpacks their examples.

    Args:
        result: what :func:`~lightning_influence.compute_influence` returned.
        loggers: the trainer's loggers; TensorBoard and W&B get their own panels, every other
            logger the diagnostics through ``log_metrics`` and the files in ``out_dir`` (also
            written when there is no logger).
        train_data: the training ``Dataset`` (or a ``DataLoader`` over it).
        val_data: the validation ``Dataset`` (or a ``DataLoader`` over it).
        task: turns a batch into ``(inputs, targets)``.
        out_dir: folder for the files (created if missing).
        settings: what to show; :class:`LogSettings` defaults otherwise.
        result_path: the saved result file, logged as a W&B artifact when given.
        step: the step every logger records the entries at.

    Returns:
        Paths of the files written to ``out_dir`` (the dashboard folder by its index).

    Example:
        >>> import tempfile, torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence import ClassificationTask, Exact, compute_influence
        >>> data = TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
        >>> result = compute_influence(torch.nn.Linear(3, 2), data, data, solver=Exact(),
        ...                            damping=0.1, progress=False)
        >>> out = Path(tempfile.mkdtemp())
        >>> files = log_influence(result, [], data, data, ClassificationTask(), out,
        ...                       LogSettings(n_val=2, top_k=3))
        >>> sorted(f.relative_to(out).as_posix() for f in files)[:3]
        ['influence.md', 'influence_dashboard/index.json', 'influence_diagnostics.json']
    """
    if getattr(rank_zero_only, "rank", 0) != 0:
        return []
    settings = settings or LogSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(result, train_data, val_data, task, settings)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", settings.prefix)

    with PngWriter() as pngs:  # the dashboard's pictures are written while the figures are drawn
        files = [
            *write_tables(report, out_dir, stem),
            write_dashboard(report, out_dir, stem, pngs.write),
        ]
        draw_figures(report)
        plain = not loggers
        for logger in loggers:
            writer = _writer(logger)
            if writer is not None:
                writer(logger, report, settings.prefix, step, result_path)
            else:
                plain = True
                logger.log_metrics(
                    {f"{settings.prefix}/{k}": v for k, v in report.scalars.items()}, step=step
                )
                logger.save()
        if plain:
            files += write_files(report, out_dir, stem, pngs.write)
    return files


def _writer(logger: Logger) -> Writer | None:
    """The writer of the nearest logger type in ``WRITERS`` that ``logger`` is an instance of."""
    return next((WRITERS[t] for t in type(logger).__mro__ if t in WRITERS), None)
