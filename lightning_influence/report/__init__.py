"""What is shown: the report model, its drawing and tables, and one writer per logger."""

from lightning_influence.report.report import LogSettings, log_influence

__all__ = ["LogSettings", "log_influence"]
