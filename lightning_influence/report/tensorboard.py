"""TensorBoard: images, markdown tables and histograms under one tag prefix.

The diagnostics go into one text summary, not a single-point chart each; the Influence tab
(:mod:`.plugin`) reads the files of :mod:`.dashboard` written beside the result.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger

from lightning_influence.report.model import Report
from lightning_influence.report.tables import outliers_markdown, panel_markdown, summary_markdown

__all__ = ["write_tensorboard"]


def write_tensorboard(
    logger: TensorBoardLogger, report: Report, prefix: str, step: int, result_path: Path | None
) -> None:
    """Write ``report`` to the logger's ``SummaryWriter`` at ``step``; the result file stays where
    it is (TensorBoard has no place for it)."""
    writer = logger.experiment
    text_inputs = not report.images
    for panel in report.panels:
        tag = f"{prefix}/val_{panel.val.index}"
        if panel.figure is not None:
            writer.add_image(tag, panel.figure, step, dataformats="CHW")
        writer.add_text(tag, panel_markdown(panel, text_inputs), step)
    if report.outliers:
        if report.outliers_figure is not None:
            writer.add_image(f"{prefix}/outliers", report.outliers_figure, step, dataformats="CHW")
        writer.add_text(f"{prefix}/outliers", outliers_markdown(report), step)
    writer.add_text(f"{prefix}/summary", summary_markdown(report.result), step)
    for name, values in report.histograms.items():
        writer.add_histogram(f"{prefix}/{name}", values, step)
    writer.flush()
