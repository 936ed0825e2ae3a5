"""The report: what is shown of an :class:`InfluenceResult`, built once for every backend.

:func:`build_report` fetches the examples the rankings name (by dataset index), labels them,
renders image-like inputs as tiles and gathers panels (a validation example with its most helpful
and harmful training examples, in the relative and the raw ranking), the self-influence review
list, histograms and diagnostics.
Image-like inputs (one example shaped ``[C, H, W]`` or ``[H, W]``) become pictures; other inputs
are shown as text through ``LogSettings.describe``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_influence.core.data import as_indexed
from lightning_influence.core.task import Task
from lightning_influence.core.tokens import token_shares_of
from lightning_influence.report import drawing
from lightning_influence.report.describe import (
    Tokens,
    describe_input,
    format_label,
    input_fields,
    token_pieces,
)
from lightning_influence.report.settings import LogSettings

if TYPE_CHECKING:
    from lightning_influence.result import InfluenceResult, Ranking

__all__ = ["Example", "Panel", "Report", "Row", "build_report", "draw_figures"]


@dataclass
class Example:
    """One example as shown: dataset index, label, prediction, a score and its picture or text.

    In a ranking, ``score`` is the raw score and ``relative_score`` the relative one (``None``
    without self-influence); in the review list ``score`` is self-influence.
    """

    index: int
    label: str
    prediction: str
    score: float
    text: str
    image: Tensor | None = None  # [3, h, w] uint8, upscaled
    saliency: Tensor | None = None  # [3, h, w] uint8, red raises the validation loss
    fields: tuple[tuple[str, str], ...] = ()  # (feature name, value) of a tabular input
    removal_effect: float | None = None  # change of the validation loss if removed from training
    relative_score: float | None = None  # score / sqrt(self-influence), in a ranking
    tokens: Tokens = ()  # a sequence's tokens and their shares of the score, where computed


@dataclass(frozen=True)
class Row:
    """One line of a table: a ranked example, with its kind, ranking (``"relative"`` or
    ``"raw"``) and validation example in rankings."""

    rank: int
    example: Example
    kind: str = ""
    val: Example | None = None
    times_median: float | None = None  # self-influence over its median, in the review list
    panel: Panel | None = None  # the validation example's panel, in the list of them
    ranking: str = ""  # "relative" or "raw", in rankings


@dataclass
class Panel:
    """A validation example with its top helpful and harmful training examples: ``helpful`` and
    ``harmful`` by raw score (the figure draws these), ``relative_helpful`` and
    ``relative_harmful`` by relative score (empty without self-influence)."""

    val: Example  # score = its loss
    helpful: list[Example]
    harmful: list[Example]
    spread: float = math.nan  # standard deviation of its scores over the training set
    figure: Tensor | None = None  # [3, H, W] uint8
    relative_helpful: list[Example] = field(default_factory=list)
    relative_harmful: list[Example] = field(default_factory=list)

    @property
    def correct(self) -> bool | None:
        """Whether the model predicts the validation example's label (``None``: no label)."""
        return None if self.val.label == "-" else self.val.label == self.val.prediction

    def rows(self, ranking: str | None = None) -> list[Row]:
        """Helpful then harmful examples, ranked from 1 within each kind, of ``ranking``
        (``"relative"`` or ``"raw"``); both when ``None``, the relative ranking first."""
        lists = {
            "relative": (self.relative_helpful, self.relative_harmful),
            "raw": (self.helpful, self.harmful),
        }
        return [
            Row(rank, e, kind, self.val, ranking=name)
            for name, (helpful, harmful) in lists.items()
            if ranking in (None, name)
            for kind, examples in (("helpful", helpful), ("harmful", harmful))
            for rank, e in enumerate(examples, start=1)
        ]


@dataclass
class Report:
    """Everything shown, built once: panels, the review list, histograms and diagnostics.

    ``panels`` are the validation examples the loggers show; ``dashboard`` holds those and more
    (``LogSettings.dashboard_size``) for the Influence tab, and ``review`` the training examples
    ranked by self-influence, of which ``outliers`` are the first ``n_outliers``.
    """

    result: InfluenceResult
    kind: str  # "image", "text" or "table"
    panels: list[Panel]
    dashboard: list[Panel]
    review: list[Example]  # score = self-influence, highest first
    outliers: list[Example]
    outliers_figure: Tensor | None = None  # [3, H, W] uint8
    histograms: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    median_self_influence: float = math.nan

    @property
    def images(self) -> bool:
        return self.kind == "image"

    def validation_rows(self) -> list[Row]:
        """Every validation example kept for the dashboard, with its panel."""
        return [Row(n, p.val, panel=p) for n, p in enumerate(self.dashboard, start=1)]

    def outlier_rows(self) -> list[Row]:
        """The review list ranked from 1, highest self-influence first."""
        median = self.median_self_influence
        return [
            Row(rank, e, times_median=e.score / median if median > 0 else None)
            for rank, e in enumerate(self.outliers, start=1)
        ]


def build_report(
    result: InfluenceResult,
    train_data: Dataset[Any] | DataLoader[Any],
    val_data: Dataset[Any] | DataLoader[Any],
    task: Task,
    settings: LogSettings,
) -> Report:
    """Fetch, label and render as tiles what ``settings`` asks to show of ``result``; the
    figures that gather the tiles come from :func:`draw_figures`."""
    train = _ExampleSource(train_data, task, settings, result.train_indices)
    val = _ExampleSource(val_data, task, settings, result.val_indices)
    train.labels(result.train_targets, result.train_predictions)
    val.labels(result.val_targets, result.val_predictions)

    shown = _val_columns(result, settings).tolist()
    more = range(min(settings.dashboard_size, result.val_indices.numel()))
    columns = shown + [j for j in more if j not in shown and settings.val_indices is None]
    k = settings.top_k
    rankings = {"raw": (result.helpful(k), result.harmful(k))}
    relative = None
    if result.self_influence is not None:
        relative = result.relative_scores
        rankings["relative"] = (result.helpful(k, relative=True), result.harmful(k, relative=True))
    at = torch.tensor(columns, dtype=torch.long)
    wanted_train = [r.indices[at].reshape(-1) for pair in rankings.values() for r in pair]
    ranked = None
    if result.self_influence is not None:
        ranked = result.outliers(max(settings.n_outliers, settings.dashboard_size))
        wanted_train.append(ranked.indices)
    val.load(result.val_indices[at])
    train.load(torch.cat(wanted_train))
    kind = train.kind if train.kind == val.kind else "text"
    images = kind == "image"

    losses = result.val_losses
    spread = result.scores.float().std(dim=0) if result.n_train > 1 else None
    maps = _saliency_tiles(result, columns, settings.image_size) if images else {}
    row = {int(i): n for n, i in enumerate(result.train_indices.tolist())}

    def examples(j: int, half: int, ranking: Ranking) -> list[Example]:
        """The examples ``ranking`` names for column ``j`` (half 0: helpful), each with its raw
        and relative score and, as ``result.removal_effect``, -score / n_train."""
        out = []
        for i in ranking.indices[j].tolist():
            e = train.example(i, float(result.scores[row[i], j]), maps.get((j, half, i)))
            e.removal_effect = -e.score / result.n_train
            e.relative_score = None if relative is None else float(relative[row[i], j])
            shares = token_shares_of(result.token_shares, result.token_share_indices, j, i)
            e.tokens = () if shares is None else train.tokens(i, shares)
            out.append(e)
        return out

    panels = []
    for j in columns:
        loss = float(losses[j]) if losses is not None else math.nan
        helpful, harmful = (examples(j, half, r) for half, r in enumerate(rankings["raw"]))
        panel = Panel(val.example(int(result.val_indices[j]), loss), helpful, harmful)
        if "relative" in rankings:
            panel.relative_helpful, panel.relative_harmful = (
                examples(j, half, r) for half, r in enumerate(rankings["relative"])
            )
        panel.spread = math.nan if spread is None else float(spread[j])
        panels.append(panel)
    review = []
    if ranked is not None:
        pairs = zip(ranked.indices.tolist(), ranked.scores.tolist(), strict=True)
        review = [train.example(i, s) for i, s in pairs]
    outliers = review[: settings.n_outliers]
    histograms = {"scores": _finite(result.scores)}
    median = math.nan
    if result.self_influence is not None:
        values = _finite(result.self_influence)
        histograms["log10_self_influence"] = values[values > 0].log10()
        median = float(values.median()) if values.numel() else math.nan
    return Report(
        result=result,
        kind=kind,
        panels=panels[: len(shown)],
        dashboard=panels,
        review=review,
        outliers=outliers,
        histograms={name: values for name, values in histograms.items() if values.numel()},
        scalars={**{k: float(v) for k, v in result.diagnostics.items()}, "damping": result.damping},
        median_self_influence=median,
    )


def draw_figures(report: Report) -> None:
    """Draw the figures of image examples: a panel figure per shown validation example, and
    the review list's."""
    if not report.images:
        return
    for panel in report.panels:
        panel.figure = drawing.panel_figure(panel)
    if report.outliers:
        report.outliers_figure = drawing.outliers_figure(
            report.outliers, report.median_self_influence
        )


def _finite(values: Tensor) -> Tensor:
    flat = values.detach().reshape(-1).float().cpu()
    return flat[torch.isfinite(flat)]


def _val_columns(result: InfluenceResult, settings: LogSettings) -> Tensor:
    """Positions (columns of ``result.scores``) of the validation examples to show."""
    if settings.val_indices is None:
        return torch.arange(min(settings.n_val, result.val_indices.numel()))
    positions = []
    for index in settings.val_indices:
        hits = (result.val_indices == index).nonzero().flatten()
        if hits.numel() == 0:
            raise ValueError(
                f"`val_indices` names validation dataset index {index}, which the result does "
                f"not hold; it holds {result.val_indices[:10].tolist()}"
                f"{' ...' if result.val_indices.numel() > 10 else ''}."
            )
        positions.append(int(hits[0]))
    return torch.tensor(positions, dtype=torch.long)


class _ExampleSource:
    """Fetches examples of one dataset by dataset index and renders them once."""

    def __init__(
        self,
        data: Dataset[Any] | DataLoader[Any],
        task: Task,
        settings: LogSettings,
        indices: Tensor,
    ) -> None:
        self.data = as_indexed(data)
        self.task = task
        self.settings = settings
        self.position = {int(i): p for p, i in enumerate(indices.tolist())}
        self.targets: Tensor | None = None
        self.predictions: Tensor | None = None
        self.inputs: dict[int, Any] = {}
        self.tiles: dict[int, Tensor] = {}
        self.shown: dict[int, tuple[str, str, str, tuple[tuple[str, str], ...]]] = {}
        self.kind = "image" if settings.kind == "auto" else settings.kind

    def labels(self, targets: Tensor | None, predictions: Tensor | None) -> None:
        self.targets, self.predictions = targets, predictions

    def load(self, indices: Tensor) -> None:
        unique = torch.unique(indices)
        if unique.numel() == 0:
            return
        inputs, _ = self.task.unpack(self.data.fetch(unique))
        for n, index in enumerate(unique.tolist()):
            self.inputs[index] = _nth(inputs, n)
        if self.settings.kind == "auto":
            self.kind = "image" if all(_is_image(x) for x in self.inputs.values()) else "text"
        if self.kind != "image":
            return
        size = self.settings.image_size
        if isinstance(inputs, Tensor) and inputs.ndim in (3, 4):  # one batch: drawn at once
            tiles = drawing.image_tiles(inputs, size)
            self.tiles.update(zip(unique.tolist(), tiles, strict=True))
            return
        for index, x in self.inputs.items():
            self.tiles[index] = drawing.image_tile(x, size)

    @property
    def _describe(self) -> Callable[[Any], str] | None:
        """The settings' ``describe``, else the task's own (token ids to text, say), if any."""
        return self.settings.describe or getattr(self.task, "describe", None)

    def _label(self, labels: Tensor | None, index: int) -> str:
        pos = self.position.get(index)
        if labels is None or pos is None:
            return "-"
        return format_label(labels[pos], self.settings.class_names)

    def _shown(self, index: int) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
        """The label, prediction, text and fields of an input, made once per index."""
        if index not in self.shown:
            x, describe = self.inputs[index], self._describe
            fields = input_fields(x, self.settings.feature_names) if self.kind == "table" else ()
            if describe is not None:
                text = describe(x)
            elif fields:
                text = ", ".join(f"{n}={v}" for n, v in fields)
            else:
                text = describe_input(x)
            label, prediction = (
                self._label(self.targets, index),
                self._label(self.predictions, index),
            )
            self.shown[index] = (label, prediction, text, fields)
        return self.shown[index]

    def tokens(self, index: int, shares: Tensor) -> Tokens:
        """The tokens of the input of dataset index ``index`` with their ``shares``."""
        return token_pieces(self.inputs[index], shares, getattr(self.task, "decode", None))

    def example(self, index: int, score: float, saliency: Tensor | None = None) -> Example:
        """The example of dataset index ``index``, with ``score`` and a saliency tile, if any."""
        label, prediction, text, fields = self._shown(index)
        return Example(
            index=index,
            label=label,
            prediction=prediction,
            score=score,
            text=text,
            image=self.tiles.get(index),
            saliency=saliency,
            fields=fields,
        )


def _saliency_tiles(
    result: InfluenceResult, columns: list[int], size: int
) -> dict[tuple[int, int, int], Tensor]:
    """The tiles of the ``I_pert,loss`` maps of validation columns ``columns``, drawn at once,
    by (validation column, half, training index): half 0 is the helpful columns of a row of
    ``result.perturbation``, 1 the harmful ones. Empty when the maps were not computed."""
    maps, indices = result.perturbation, result.perturbation_indices
    if maps is None or indices is None or indices.shape[1] < 2:
        return {}
    chosen = maps[columns]
    tiles = drawing.saliency_tiles(chosen.reshape(-1, *chosen.shape[2:]), size)
    tiles = tiles.reshape(*chosen.shape[:2], *tiles.shape[1:])
    k = indices.shape[1] // 2
    where: dict[tuple[int, int, int], Tensor] = {}
    for n, j in enumerate(columns):
        for c, i in enumerate(indices[j].tolist()):
            where.setdefault((j, c // k, i), tiles[n, c])
    return where


def _nth(inputs: Any, n: int) -> Any:
    """The ``n``-th example of a batch of inputs (tensor, sequence or dict of those)."""
    if isinstance(inputs, Mapping):
        return {k: _nth(v, n) for k, v in inputs.items()}
    if isinstance(inputs, Tensor | np.ndarray | list | tuple):
        return inputs[n]
    return inputs


def _is_image(x: Any) -> bool:
    if not isinstance(x, Tensor) or not (x.is_floating_point() or x.dtype == torch.uint8):
        return False
    if x.ndim == 3:
        return 1 <= x.shape[0] <= 4 and min(x.shape[1:]) >= 2
    return x.ndim == 2 and min(x.shape) >= 2
