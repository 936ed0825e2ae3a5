"""Tables: markdown (TensorBoard's Text tab, the markdown report) and CSV, from one column list.

A :class:`Column` says once what a table column holds; :data:`RANKINGS` and :data:`OUTLIERS` list
them for the tables: the validation examples, their helpful and harmful training examples, and the
self-influence review list. Every backend reads its cells through these lists.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_influence.report.describe import marked_tokens
from lightning_influence.report.model import Example, Panel, Report, Row

if TYPE_CHECKING:
    from lightning_influence.result import InfluenceResult

__all__ = [
    "INPUT",
    "MISLABELED_NOTE",
    "OUTLIERS",
    "RANKINGS",
    "TOKENS",
    "VALIDATION",
    "VAL_INPUT",
    "Column",
    "outliers_markdown",
    "panel_markdown",
    "summary_markdown",
    "write_csv",
]


@dataclass(frozen=True)
class Column:
    """One column: its key (CSV and W&B), its markdown header and how a row fills it."""

    key: str
    header: str
    value: Callable[[Row], Any]
    number: str = ""  # format of a float in markdown; CSV keeps every digit
    markdown: bool = True  # shown in the markdown tables (False: CSV and W&B only)

    def text(self, row: Row) -> str:
        value = self.value(row)
        if value is None:
            return "-"
        return format(value, self.number) if self.number else str(value)


def _panel(row: Row) -> Panel:
    if row.panel is None:
        raise ValueError("a validation row needs its panel")
    return row.panel


def _val(row: Row) -> Example:
    if row.val is None:
        raise ValueError("a ranking row needs its validation example")
    return row.val


RANKINGS: tuple[Column, ...] = (
    Column("val_index", "val index", lambda r: _val(r).index, markdown=False),
    Column("val_label", "val label", lambda r: _val(r).label, markdown=False),
    Column("val_prediction", "val prediction", lambda r: _val(r).prediction, markdown=False),
    Column("ranking", "ranking", lambda r: r.ranking, markdown=False),
    Column("kind", "kind", lambda r: r.kind),
    Column("rank", "rank", lambda r: r.rank),
    Column("train_index", "train index", lambda r: r.example.index),
    Column("label", "label", lambda r: r.example.label),
    Column("prediction", "prediction", lambda r: r.example.prediction),
    Column("score", "score", lambda r: r.example.score, "+.4g"),
    Column("relative_score", "relative", lambda r: r.example.relative_score, "+.4g"),
    Column("removal_effect", "if removed", lambda r: r.example.removal_effect, "+.3g"),
)
VALIDATION: tuple[Column, ...] = (
    Column("val_index", "val index", lambda r: r.example.index),
    Column("label", "label", lambda r: r.example.label),
    Column("prediction", "prediction", lambda r: r.example.prediction),
    Column("loss", "loss", lambda r: r.example.score, ".4g"),
    Column("correct", "correct", lambda r: _panel(r).correct),
    Column("spread", "spread", lambda r: _panel(r).spread, ".3g"),
)
OUTLIERS: tuple[Column, ...] = (
    Column("rank", "rank", lambda r: r.rank),
    Column("index", "index", lambda r: r.example.index),
    Column("given_label", "given label", lambda r: r.example.label),
    Column("predicted_label", "predicted label", lambda r: r.example.prediction),
    Column("self_influence", "self-influence", lambda r: r.example.score, ".4g"),
    Column("times_median", "x median", lambda r: r.times_median, ".3g"),
)
# Inputs shown as text (decoded sequences, sentences) also go in the CSV and W&B tables.
VAL_INPUT = Column("val_input", "val input", lambda r: _val(r).text, markdown=False)
INPUT = Column("input", "input", lambda r: r.example.text, markdown=False)
# A sequence's text with the tokens that carry the largest shares of its score marked.
TOKENS = Column("tokens", "tokens", lambda r: _marked(r.example) or None, markdown=False)
_NUMERIC = {"rank", "train_index", "index", "score", "relative_score", "removal_effect"}
_NUMERIC |= {"self_influence"}
_NUMERIC |= {"times_median", "loss", "spread"}
MISLABELED_NOTE = (
    "A training example with a wrong label can still be helpful: its input resembles this "
    "example's, so learning from it moves the model the same way. Judge labels by "
    "self-influence (the review list), not by this panel."
)
SCORE_NOTE = (
    "Score: how much up-weighting a training example changes this example's loss; negative = "
    "it helped (lowered the loss), positive = it hurt. *If removed*: the predicted change of "
    "this loss when the example is left out of training, -score / (number of training examples)."
)
RELATIVE_NOTE = (
    "*Relative* ranking: by score / sqrt(self-influence), the training examples most specific to "
    "this example; the raw ranking favours examples with large gradients (outliers, mislabels) "
    "that lead the lists of every example alike."
)
RAW_NOTE = (
    "*Raw* ranking: by score, the predicted effect of up-weighting each training example on "
    "this loss, whatever else it moves."
)


def _markdown(columns: Sequence[Column], rows: Sequence[Row], text_inputs: bool) -> list[str]:
    """Header, rule and body lines; an ``input`` column with each example's text when asked."""
    shown = [c for c in columns if c.markdown]
    head = [c.header for c in shown] + (["input"] if text_inputs else [])
    rule = ["---:" if c.key in _NUMERIC else "---" for c in shown] + ["---"] * text_inputs
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(rule) + " |"]
    for row in rows:
        cells = [c.text(row) for c in shown]
        cells += [f"`{_escape(_marked(row.example) or row.example.text)}`"] if text_inputs else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _marked(e: Example) -> str:
    """The text with its largest token shares marked, or ``""`` without token shares."""
    return marked_tokens(e.tokens, e.score) if e.tokens else ""


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def panel_markdown(panel: Panel, text_inputs: bool) -> str:
    """A validation example's line, then its helpful and harmful training examples."""
    v = panel.val
    loss = "" if math.isnan(v.score) else f", loss {v.score:.4g}"
    lines = [f"**Validation example {v.index}**: label {v.label}, predicted {v.prediction}{loss}."]
    if text_inputs:
        lines.append(f"Input: `{_escape(v.text)}`")
    lines += [SCORE_NOTE, "", MISLABELED_NOTE, ""]
    if panel.relative_helpful or panel.relative_harmful:
        lines += [RELATIVE_NOTE, ""]
        lines += [*_markdown(RANKINGS, panel.rows("relative"), text_inputs), "", RAW_NOTE, ""]
    return "\n".join(lines + _markdown(RANKINGS, panel.rows("raw"), text_inputs))


def outliers_markdown(report: Report) -> str:
    """The review list: highest self-influence first."""
    lines = [
        "**Highest self-influence**: review these training labels first. Self-influence says how "
        "much an example shapes its own prediction; *x median* compares it with a typical "
        "example.",
        "",
    ]
    return "\n".join(lines + _markdown(OUTLIERS, report.outlier_rows(), not report.images))


def summary_markdown(result: InfluenceResult) -> str:
    """Sizes, damping, the diagnostics table and the solver's settings."""
    lines = [
        f"**{result.n_train} training x {result.val_indices.numel()} validation examples**, "
        f"damping {result.damping:g}.",
        "",
        "| diagnostic | value |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {v:.4g} |" for k, v in result.diagnostics.items()]
    solver = result.settings.get("solver")
    if solver:
        lines += ["", f"Solver: `{json.dumps(solver)}`"]
    return "\n".join(lines)


def write_csv(path: Path, columns: Sequence[Column], rows: Sequence[Row]) -> Path | None:
    """One CSV row per table row, floats with every digit (``repr``); nothing when empty."""
    if not rows:
        return None
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([c.key for c in columns])
        for row in rows:
            values = [c.value(row) for c in columns]
            writer.writerow([repr(v) if isinstance(v, float) else v for v in values])
    return path
