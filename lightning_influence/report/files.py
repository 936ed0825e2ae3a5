"""Plain files: PNG images, a markdown report with the tables, CSV tables and the diagnostics as
JSON, in one folder. The CSV tables (the self-influence review list and the rankings: relative and
raw, each row with its raw ``score`` and ``relative_score``) are written for every logger; the rest
when a logger has no panels of its own (or there is no logger)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from lightning_influence.report.histogram import histogram_figure
from lightning_influence.report.model import Report
from lightning_influence.report.raster import write_png
from lightning_influence.report.tables import (
    INPUT,
    OUTLIERS,
    RANKINGS,
    TOKENS,
    VAL_INPUT,
    outliers_markdown,
    panel_markdown,
    summary_markdown,
    write_csv,
)

__all__ = ["write_files", "write_tables"]


def write_tables(report: Report, out_dir: Path, stem: str) -> list[Path]:
    """The review list and the rankings as CSV (those that are not empty)."""
    rankings = [row for panel in report.panels for row in panel.rows()]
    outliers, ranking = list(OUTLIERS), list(RANKINGS)
    if not report.images:  # inputs shown as text go in the tables too
        outliers, ranking = [*outliers, INPUT], [*ranking, VAL_INPUT, INPUT, TOKENS]
    files = [
        write_csv(out_dir / f"{stem}_outliers.csv", outliers, report.outlier_rows()),
        write_csv(out_dir / f"{stem}_rankings.csv", ranking, rankings),
    ]
    return [f for f in files if f is not None]


def write_files(
    report: Report, out_dir: Path, stem: str, save: Callable[[Tensor, Path], Path] = write_png
) -> list[Path]:
    """PNG images (each written by ``save``), a markdown report with the tables, and the
    diagnostics as JSON."""
    files: list[Path] = []
    text_inputs = not report.images
    sections = [f"# Influence report\n\n{summary_markdown(report.result)}"]
    for panel in report.panels:
        section = panel_markdown(panel, text_inputs)
        if panel.figure is not None:
            png = save(panel.figure, out_dir / f"{stem}_val_{panel.val.index}.png")
            files.append(png)
            section = f"![validation example {panel.val.index}]({png.name})\n\n{section}"
        sections.append(f"## Validation example {panel.val.index}\n\n{section}")
    if report.outliers:
        section = outliers_markdown(report)
        if report.outliers_figure is not None:
            png = save(report.outliers_figure, out_dir / f"{stem}_outliers.png")
            files.append(png)
            section = f"![outliers]({png.name})\n\n{section}"
        sections.append(f"## Self-influence outliers\n\n{section}")
    hist = histogram_figure(report.histograms)
    if hist is not None:
        png = save(hist, out_dir / f"{stem}_histograms.png")
        files.append(png)
        sections.append(f"## Histograms\n\n![histograms]({png.name})")
    md = out_dir / f"{stem}.md"
    md.write_text("\n\n".join(sections) + "\n")
    diag = out_dir / f"{stem}_diagnostics.json"
    diag.write_text(json.dumps(report.scalars, indent=2) + "\n")
    return [*files, md, diag]
