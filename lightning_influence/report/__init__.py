"""Show an :class:`~lightning_influence.InfluenceResult` where users look.

:func:`log_influence` builds the report once (:mod:`.model`: examples, panels, the review list;
:mod:`.drawing` and :mod:`.histogram`: pictures, lettered by :mod:`.lettering` and saved as PNG by
:mod:`.raster`; :mod:`.tables`: markdown and CSV) and hands it to one writer per logger
type: :mod:`.tensorboard`, :mod:`.wandb`; every other logger gets the diagnostics through
``log_metrics`` and the plain files of :mod:`.files`. The CSV tables and the folder the Influence
tab of TensorBoard reads (:mod:`.dashboard`, shown by :mod:`.plugin`) are always written. What is
shown is set by :class:`LogSettings`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_influence.lazy import lazy_attributes

if TYPE_CHECKING:
    from lightning_influence.report.loggers import WRITERS as WRITERS
    from lightning_influence.report.loggers import log_influence
    from lightning_influence.report.settings import LogSettings

_SOURCES: dict[str, str] = {
    "LogSettings": "lightning_influence.report.settings",
    "WRITERS": "lightning_influence.report.loggers",
    "log_influence": "lightning_influence.report.loggers",
}
"""Where each name lives; Lightning's loggers load with :mod:`.loggers`, on first use."""

__all__ = ["LogSettings", "log_influence"]


__getattr__ = lazy_attributes(__name__, _SOURCES)
