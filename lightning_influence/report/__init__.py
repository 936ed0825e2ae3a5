"""What is shown: the report model, its drawing and tables, and one writer per logger."""

from lightning_influence.report.report import log_influence
from lightning_influence.report.settings import LogSettings

__all__ = ["LogSettings", "log_influence"]
