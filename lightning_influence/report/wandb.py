"""Weights & Biases: tables (validation examples, the rankings relative and raw with both scores,
the review list) with image cells, or text and feature columns; the panel images, histograms,
summary values and the saved result file as an artifact. ``wandb`` is imported only here, when a
``WandbLogger`` is present."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from lightning_influence.report.model import Report, Row
from lightning_influence.report.raster import to_uint8
from lightning_influence.report.tables import OUTLIERS, RANKINGS, VALIDATION, Column

__all__ = ["write_wandb"]

Media = Callable[[Row], Any]


def write_wandb(
    logger: WandbLogger, report: Report, prefix: str, step: int, result_path: Path | None
) -> None:
    """Log ``report`` to the logger's run at ``step``, and ``result_path`` as an artifact."""
    import wandb  # optional dependency

    run = logger.experiment

    def picture(img: Tensor | None, caption: str = "") -> Any:
        return None if img is None else wandb.Image(to_uint8(img), caption=caption or None)

    def table(columns: tuple[Column, ...], rows: list[Row], media: dict[str, Media]) -> Any:
        """The columns' values, then the inputs: text columns, or image cells."""
        keys: list[str | int] = [c.key for c in columns]
        out = wandb.Table(columns=keys + list(media))
        for row in rows:
            out.add_data(*[c.value(row) for c in columns], *[cell(row) for cell in media.values()])
        return out

    logged: dict[str, Any] = {}
    inputs: dict[str, Media] = {"image": lambda r: picture(r.example.image)}
    if not report.images:
        inputs = _inputs(report)
    if report.panels:
        rows = [row for panel in report.panels for row in panel.rows()]
        media: dict[str, Media] = {
            "image": lambda r: picture(r.example.image),
            "saliency": lambda r: picture(r.example.saliency),
        }
        if not report.images:
            media = {"val_input": lambda r: r.val and r.val.text, **inputs}
        logged[f"{prefix}/rankings"] = table(RANKINGS, rows, media)
        for panel in report.panels:
            if panel.figure is not None:
                logged[f"{prefix}/val_{panel.val.index}"] = picture(
                    panel.figure, f"validation example {panel.val.index}"
                )
    if report.dashboard:
        logged[f"{prefix}/validation"] = table(VALIDATION, report.validation_rows(), inputs)
    if report.outliers:
        logged[f"{prefix}/outliers"] = table(OUTLIERS, report.outlier_rows(), inputs)
        if report.outliers_figure is not None:
            logged[f"{prefix}/outliers_image"] = picture(report.outliers_figure, "outliers")
    for name, values in report.histograms.items():
        logged[f"{prefix}/{name}"] = wandb.Histogram(
            np_histogram=np.histogram(values.numpy(), bins=64)
        )
    run.log({**logged, "trainer/global_step": step})
    for name, value in report.scalars.items():
        run.summary[f"{prefix}/{name}"] = value
    if result_path is not None:
        artifact = wandb.Artifact(f"{prefix.replace('/', '-')}-result-{run.id}", type="influence")
        artifact.add_file(str(result_path))
        run.log_artifact(artifact)


def _inputs(report: Report) -> dict[str, Media]:
    """Text columns of a non-image input: ``input``, and one column per feature of a table."""
    media: dict[str, Media] = {"input": lambda r: r.example.text}
    names = [n for n, _ in report.dashboard[0].val.fields] if report.dashboard else []
    for n, name in enumerate(names):
        media[name] = _field(n)
    return media


def _field(n: int) -> Media:
    """The value of the ``n``-th feature of a row's example."""
    return lambda r: r.example.fields[n][1] if len(r.example.fields) > n else None
