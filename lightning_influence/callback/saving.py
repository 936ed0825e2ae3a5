"""Saving and logging the callback's result on rank zero, without ever losing it.

A write error (a full disk, a folder that vanished) leaves the result in memory, logs what can
still be logged, and comes back as an :class:`~lightning_influence.InfluenceError` naming the
path, for every process to raise.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from lightning_influence.config import InfluenceConfig
from lightning_influence.core.data import IndexedData
from lightning_influence.errors import InfluenceError
from lightning_influence.report import LogSettings, log_influence
from lightning_influence.result import InfluenceResult

__all__ = ["save_and_log"]


def save_and_log(
    result: InfluenceResult,
    path: Path,
    trainer: L.Trainer,
    train: IndexedData,
    val: IndexedData,
    config: InfluenceConfig,
    log: LogSettings,
) -> InfluenceError | None:
    """Save ``result`` to ``path`` and log it to the trainer's loggers; the error, if any."""
    saved: Exception | None = None
    try:
        result.save(path)
    except (OSError, RuntimeError) as err:
        saved = err
    try:
        log_influence(
            result,
            trainer.loggers,
            train.dataset,
            val.dataset,
            config.make_task(),
            path.parent,
            log,
            result_path=None if saved else path,
            step=trainer.global_step,
        )
    except (OSError, RuntimeError) as err:
        if saved is None:
            return InfluenceError(
                f"InfluenceCallback saved the result to {path} but could not log it: {err}"
            )
    if saved is not None:
        return InfluenceError(
            f"InfluenceCallback could not save the result to {path}: {saved}. Nothing is lost: "
            "the result is in `callback.result`; save it elsewhere with "
            "`callback.result.save(path)`."
        )
    return None
