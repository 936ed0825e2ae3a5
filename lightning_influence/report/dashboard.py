"""The files the Influence tab of TensorBoard reads: a JSON index and PNG pictures, in one folder.

``<out_dir>/<stem>_dashboard/`` (next to the result file; ``<stem>`` is the tag prefix made
file-safe, ``influence`` by default) holds:

- ``index.json``: ``{"format": "lightning-influence-dashboard", "version": 1, ...}`` with the
  run's ``summary`` (sizes, damping, diagnostics, solver), the example ``kind`` (``image``,
  ``text`` or ``table``) and its ``feature_names``, ``validation``: one entry per validation
  example kept (dataset ``index``, ``label``, ``prediction``, ``loss``, ``correct``, ``spread``:
  the standard deviation of its scores, ``text``, ``fields``, ``image``) with its ``helpful`` and
  ``harmful`` training examples by raw score (``rank``, ``index``, ``label``, ``prediction``,
  ``score``, ``relative_score``: score / sqrt(self-influence), or ``null``, ``removal_effect``: the
  predicted change of this validation loss when the example is removed, ``text``, ``fields``,
  ``image``, ``saliency``, ``tokens``: ``[text, share]`` per token of a sequence, its share of
  the score or ``null`` for a token without a loss, at most 64 around the largest share, where
  computed, else ``null``) and
  ``relative``: ``{"helpful": [...], "harmful": [...]}`` ranked by
  relative score (``null`` without self-influence), and ``review``: the training examples ranked
  by ``self_influence``, with ``times_median`` and the ``median``, out of ``n_train``;
- ``val_<index>.png``, ``train_<index>.png``: each example once, as drawn in the panels;
  ``map_<val index>_<train index>.png``: the input-space map of a pair, where computed.

Picture fields hold a file name in the same folder, or ``null``. Nothing in it needs unpickling.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_influence.report.describe import token_window
from lightning_influence.report.model import Example, Panel, Report
from lightning_influence.report.raster import write_png

__all__ = ["FORMAT", "INDEX", "VERSION", "write_dashboard"]

FORMAT = "lightning-influence-dashboard"
VERSION = 1
INDEX = "index.json"


def write_dashboard(
    report: Report, out_dir: Path, stem: str, save: Callable[[Tensor, Path], Path] = write_png
) -> Path:
    """Write the folder ``<out_dir>/<stem>_dashboard`` and return the path of its index;
    ``save`` writes each picture (:meth:`.raster.PngWriter.write` in the background)."""
    folder = out_dir / f"{stem}_dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    result = report.result
    pictures: dict[str, Any] = {}

    def picture(name: str, tile: Any) -> str | None:
        if tile is None:
            return None
        if name not in pictures:
            pictures[name] = save(tile, folder / name)
        return name

    def entry(e: Example, name: str, **extra: Any) -> dict[str, Any]:
        return {
            "index": e.index,
            "label": e.label,
            "prediction": e.prediction,
            **extra,
            "text": e.text,
            "fields": [list(f) for f in e.fields],
            "image": picture(name, e.image),
        }

    def ranked(panel: Panel, kind: str) -> list[dict[str, Any]]:
        v = panel.val.index
        return [
            entry(
                e,
                f"train_{e.index}.png",
                rank=rank,
                score=e.score,
                relative_score=e.relative_score,
                removal_effect=e.removal_effect,
                saliency=picture(f"map_{v}_{e.index}.png", e.saliency),
                tokens=[list(t) for t in token_window(e.tokens)] or None,
            )
            for rank, e in enumerate(getattr(panel, kind), start=1)
        ]

    validation = []
    for panel in report.dashboard:
        v = panel.val
        extra = {"loss": _number(v.score), "correct": panel.correct}
        extra["spread"] = _number(panel.spread)
        validation.append(
            {
                **entry(v, f"val_{v.index}.png", **extra),
                "helpful": ranked(panel, "helpful"),
                "harmful": ranked(panel, "harmful"),
                "relative": {
                    "helpful": ranked(panel, "relative_helpful"),
                    "harmful": ranked(panel, "relative_harmful"),
                }
                if result.self_influence is not None
                else None,
            }
        )
    median = report.median_self_influence
    review = [
        entry(
            e,
            f"train_{e.index}.png",
            rank=rank,
            self_influence=e.score,
            times_median=_number(e.score / median) if median > 0 else None,
        )
        for rank, e in enumerate(report.review, start=1)
    ]
    index = {
        "format": FORMAT,
        "version": VERSION,
        "prefix": stem,
        "kind": report.kind,
        "feature_names": [n for n, _ in report.dashboard[0].val.fields] if report.dashboard else [],
        "summary": {
            "n_train": result.n_train,
            "n_val": int(result.val_indices.numel()),
            "damping": result.damping,
            "diagnostics": {k: _number(v) for k, v in report.scalars.items()},
            "solver": result.settings.get("solver"),
        },
        "validation": validation,
        "review": {"median": _number(median), "n_train": result.n_train, "rows": review},
    }
    path = folder / INDEX
    path.write_text(json.dumps(index, allow_nan=False) + "\n")  # one line: an indent would
    # take json's pure-Python encoder, ten times slower
    return path


def _number(value: float) -> float | None:
    """``value``, or ``None`` where JSON has no number for it (NaN, infinity)."""
    return value if math.isfinite(value) else None
