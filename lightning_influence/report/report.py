"""Show an :class:`InfluenceResult` where users look: TensorBoard, Weights & Biases, plain files.

:func:`log_influence` builds every picture and table once (a :class:`_Report`) and hands the same
objects to each backend:

- **TensorBoard** (``TensorBoardLogger``): images, markdown tables, histograms and scalars under
  one tag prefix.
- **Weights & Biases** (``WandbLogger``): ``wandb.Table``s with image cells, the same images,
  histograms, summary values and the saved result file as an artifact. ``wandb`` is imported only
  when such a logger is present.
- **Plain files** (any other logger, or none): PNG images, a markdown report, CSV tables and a
  JSON file of diagnostics in ``out_dir``. The CSV review list of self-influence outliers is
  written in every case.

Image-like inputs (one example shaped ``[C, H, W]`` or ``[H, W]``) are drawn as pictures, upscaled
with nearest-neighbour interpolation so that 8x8 digits stay legible. With matplotlib installed
(the ``[examples]`` extra) the pictures are annotated figures (dataset index, label, prediction
and score above each tile); without it they are plain image grids built with torch, framed by
colour (blue: the validation example, green: helpful, red: harmful), and the text lives in the
tables beside them. Other inputs are shown as text, through ``LogSettings.describe``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_influence.core.data import as_indexed
from lightning_influence.core.task import Task
from lightning_influence.result import InfluenceResult

__all__ = ["LogSettings", "log_influence"]

_Color = tuple[float, ...]
_HELPFUL: _Color = (0.13, 0.55, 0.13)
_HARMFUL: _Color = (0.84, 0.15, 0.16)
_VALIDATION: _Color = (0.12, 0.47, 0.71)
_NEUTRAL: _Color = (0.6, 0.6, 0.6)
_HISTOGRAM_AXES = {
    "scores": "I_up,loss(train, val): < 0 helpful, > 0 harmful",
    "self_influence": "self-influence g^T (H + damping I)^-1 g",
}
_RANKING_COLUMNS = (
    *("val_index", "val_label", "val_prediction", "kind", "rank", "train_index", "label"),
    *("prediction", "score"),
)


@dataclass(frozen=True)
class LogSettings:
    """What to show, and how.

    Args:
        n_val: how many validation examples get a panel (the first ones of the result, unless
            ``val_indices`` names them).
        top_k: helpful and harmful training examples shown per validation example.
        n_outliers: training examples with the highest self-influence in the review list.
        prefix: tag prefix in TensorBoard and W&B, and the stem of the file names in ``out_dir``.
        describe: turns one input into text for tables (and replaces pictures when the inputs
            are not image-like); a short default shows shapes or values.
        val_indices: dataset indices of the validation examples to show (overrides ``n_val``).
        image_size: smallest side, in pixels, that a small image is upscaled to (nearest).
        images: draw inputs as images (``True``), as text (``False``), or decide from the shape of
            one input: ``[C, H, W]`` with ``C`` in 1..4, or ``[H, W]`` (``None``, the default).

    Example:
        >>> LogSettings(n_val=2, top_k=4).top_k
        4
        >>> LogSettings(top_k=0)
        Traceback (most recent call last):
        ...
        ValueError: `top_k` must be at least 1, got 0.
    """

    n_val: int = 8
    top_k: int = 8
    n_outliers: int = 32
    prefix: str = "influence"
    describe: Callable[[Any], str] | None = None
    val_indices: tuple[int, ...] | None = None
    image_size: int = 64
    images: bool | None = None

    def __post_init__(self) -> None:
        for name, low in (("n_val", 0), ("top_k", 1), ("n_outliers", 0), ("image_size", 8)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be at least {low}, got {value!r}.")
        if not self.prefix or self.prefix.strip("/") != self.prefix:
            raise ValueError(
                f"`prefix` must be a non-empty tag such as 'influence' with no leading or "
                f"trailing '/', got {self.prefix!r}."
            )
        if self.val_indices is not None:
            object.__setattr__(self, "val_indices", tuple(int(i) for i in self.val_indices))


def log_influence(
    result: InfluenceResult,
    loggers: Sequence[Logger],
    train_data: Dataset[Any] | DataLoader[Any],
    val_data: Dataset[Any] | DataLoader[Any],
    task: Task,
    out_dir: Path,
    settings: LogSettings | None = None,
    result_path: Path | None = None,
    step: int = 0,
) -> list[Path]:
    """Log ``result`` to every logger and write the review files; returns the files written.

    Call it on rank zero only (it does nothing elsewhere). ``train_data`` and ``val_data`` are
    the datasets the result's dataset indices refer to; ``task`` unpacks their examples.

    Args:
        result: what :func:`~lightning_influence.compute_influence` returned.
        loggers: the trainer's loggers; TensorBoard and W&B get their own panels, any other logger
            (or none) gets the files in ``out_dir``.
        train_data: the training ``Dataset`` (or a ``DataLoader`` over it).
        val_data: the validation ``Dataset`` (or a ``DataLoader`` over it).
        task: turns a batch into ``(inputs, targets)``.
        out_dir: folder for the files (created if missing).
        settings: what to show; :class:`LogSettings` defaults otherwise.
        result_path: the saved result file, logged as a W&B artifact when given.
        step: the step the TensorBoard and W&B entries are recorded at.

    Returns:
        Paths of the files written to ``out_dir``.

    Example:
        >>> import tempfile, torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence import ClassificationTask, Exact, compute_influence
        >>> data = TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
        >>> result = compute_influence(torch.nn.Linear(3, 2), data, data, solver=Exact(),
        ...                            damping=0.1, progress=False)
        >>> files = log_influence(result, [], data, data, ClassificationTask(),
        ...                       Path(tempfile.mkdtemp()), LogSettings(n_val=2, top_k=3))
        >>> sorted(f.name for f in files)[:3]
        ['influence.md', 'influence_diagnostics.json', 'influence_histograms.png']
    """
    if getattr(rank_zero_only, "rank", 0) != 0:
        return []
    settings = settings or LogSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = _build_report(result, train_data, val_data, task, settings)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", settings.prefix)

    files = [_write_outliers_csv(report, out_dir / f"{stem}_outliers.csv")]
    files.append(_write_rankings_csv(report, out_dir / f"{stem}_rankings.csv"))
    plain = not loggers
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            _log_tensorboard(logger.experiment, report, settings.prefix, step)
        elif isinstance(logger, WandbLogger):
            _log_wandb(logger.experiment, report, settings.prefix, result_path, step)
        else:
            plain = True
            logger.log_metrics({f"{settings.prefix}/{k}": v for k, v in report.scalars.items()})
            logger.save()
    if plain:
        files += _write_files(report, out_dir, stem)
    return [f for f in files if f is not None]


# ---------------------------------------------------------------------------------------------
# The report: every picture and table, built once
# ---------------------------------------------------------------------------------------------


@dataclass
class _Example:
    """One example as shown: dataset index, label, prediction, a score and its picture or text."""

    index: int
    label: str
    prediction: str
    score: float
    text: str
    image: Tensor | None = None  # [3, h, w] in [0, 1], upscaled
    saliency: Tensor | None = None  # [3, h, w] in [0, 1], red raises the validation loss


@dataclass
class _Panel:
    """A validation example with its top helpful and harmful training examples."""

    val: _Example  # score = its loss
    helpful: list[_Example]
    harmful: list[_Example]
    figure: Tensor | None = None  # [3, H, W]

    def rows(self) -> list[tuple[str, int, _Example]]:
        return [("helpful", r + 1, e) for r, e in enumerate(self.helpful)] + [
            ("harmful", r + 1, e) for r, e in enumerate(self.harmful)
        ]


@dataclass
class _Report:
    panels: list[_Panel]
    outliers: list[_Example]  # score = self-influence
    outliers_figure: Tensor | None
    histograms: dict[str, Tensor]
    scalars: dict[str, float]
    images: bool
    summary: str


def _build_report(
    result: InfluenceResult,
    train_data: Dataset[Any] | DataLoader[Any],
    val_data: Dataset[Any] | DataLoader[Any],
    task: Task,
    settings: LogSettings,
) -> _Report:
    train = _ExampleSource(train_data, task, settings, result.train_indices)
    val = _ExampleSource(val_data, task, settings, result.val_indices)
    train.labels(result.train_targets, result.train_predictions)
    val.labels(result.val_targets, result.val_predictions)

    columns = _val_columns(result, settings)
    helpful, harmful = result.helpful(settings.top_k), result.harmful(settings.top_k)
    wanted = [result.val_indices[columns]]
    wanted_train = [helpful.indices[columns].reshape(-1), harmful.indices[columns].reshape(-1)]
    outliers = result.outliers(settings.n_outliers) if result.self_influence is not None else None
    if outliers is not None:
        wanted_train.append(outliers.indices)
    val.load(torch.cat(wanted))
    train.load(torch.cat(wanted_train))
    images = train.image_like and val.image_like

    losses = result.val_losses
    panels = []
    for j in columns.tolist():
        vi = int(result.val_indices[j])
        panel = _Panel(
            val=val.example(vi, float(losses[j]) if losses is not None else math.nan),
            helpful=[
                train.example(int(i), float(s), _saliency(result, j, int(i), 0, images))
                for i, s in zip(helpful.indices[j], helpful.scores[j], strict=True)
            ],
            harmful=[
                train.example(int(i), float(s), _saliency(result, j, int(i), 1, images))
                for i, s in zip(harmful.indices[j], harmful.scores[j], strict=True)
            ],
        )
        if images:
            panel.figure = _panel_figure(panel)
        panels.append(panel)

    outlier_examples = []
    if outliers is not None:
        outlier_examples = [
            train.example(int(i), float(s))
            for i, s in zip(outliers.indices, outliers.scores, strict=True)
        ]
    histograms = {"scores": _finite(result.scores)}
    if result.self_influence is not None:
        histograms["self_influence"] = _finite(result.self_influence)
    histograms = {name: values for name, values in histograms.items() if values.numel()}
    scalars = {k: float(v) for k, v in result.diagnostics.items()}
    scalars.update(damping=float(result.damping))
    return _Report(
        panels=panels,
        outliers=outlier_examples,
        outliers_figure=_outliers_figure(outlier_examples) if images and outlier_examples else None,
        histograms=histograms,
        scalars=scalars,
        images=images,
        summary=_summary_markdown(result),
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
        self.image_like = settings.images is not False

    def labels(self, targets: Tensor | None, predictions: Tensor | None) -> None:
        self.targets, self.predictions = targets, predictions

    def load(self, indices: Tensor) -> None:
        unique = torch.unique(indices)
        if unique.numel() == 0:
            return
        inputs, _ = self.task.unpack(self.data.fetch(unique))
        for n, index in enumerate(unique.tolist()):
            self.inputs[index] = _nth(inputs, n)
        if self.settings.images is None:
            self.image_like = all(_is_image(x) for x in self.inputs.values())
        if self.image_like:
            for index, x in self.inputs.items():
                self.tiles[index] = _image_tile(x, self.settings.image_size)

    def _label(self, labels: Tensor | None, index: int) -> str:
        pos = self.position.get(index)
        return "-" if labels is None or pos is None else _format_label(labels[pos])

    def example(self, index: int, score: float, saliency: Tensor | None = None) -> _Example:
        x = self.inputs[index]
        # A task that knows its inputs (token ids -> text) describes them unless told otherwise.
        task_describe: Callable[[Any], str] = getattr(self.task, "describe", _default_describe)
        describe = self.settings.describe or task_describe
        size = self.settings.image_size
        return _Example(
            index=index,
            label=self._label(self.targets, index),
            prediction=self._label(self.predictions, index),
            score=score,
            text=describe(x),
            image=self.tiles.get(index),
            saliency=None if saliency is None else _saliency_tile(saliency, size),
        )


def _saliency(
    result: InfluenceResult, column: int, train_index: int, half: int, images: bool
) -> Tensor | None:
    """The ``I_pert,loss`` map of ``train_index`` for validation column ``column``, if computed.

    ``half`` 0 searches the helpful columns of ``result.perturbation``, 1 the harmful ones.
    """
    maps, indices = result.perturbation, result.perturbation_indices
    if not images or maps is None or indices is None:
        return None
    k = indices.shape[1] // 2
    row = indices[column, half * k : (half + 1) * k]
    hits = (row == train_index).nonzero().flatten()
    return None if hits.numel() == 0 else maps[column, half * k + int(hits[0])]


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


def _default_describe(x: Any) -> str:
    """A short text for one input: values of small tensors, shape and range of larger ones."""
    if isinstance(x, Tensor):
        flat = x.detach().float().reshape(-1)
        if flat.numel() <= 6:
            return "[" + ", ".join(f"{v:.3g}" for v in flat.tolist()) + "]"
        return (
            f"tensor{list(x.shape)} [{', '.join(f'{v:.3g}' for v in flat[:4].tolist())}, ...] "
            f"min {flat.min():.3g} max {flat.max():.3g}"
        )
    if isinstance(x, Mapping):
        return ", ".join(f"{k}: {_default_describe(v)}" for k, v in x.items())
    text = str(x).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _format_label(value: Tensor) -> str:
    if value.numel() != 1:
        return str([round(v, 3) for v in value.reshape(-1).tolist()][:4])
    item = value.item()
    return str(item) if isinstance(item, int | bool) else f"{item:.3g}"


# ---------------------------------------------------------------------------------------------
# Pictures: tiles with torch, figures with matplotlib when importable, else torch grids
# ---------------------------------------------------------------------------------------------


def _upscale(img: Tensor, size: int) -> Tensor:
    """Nearest-neighbour upscaling of ``[C, h, w]`` so that its longer side is at least ``size``;
    larger images are shrunk (area) to ``4 * size`` at most."""
    longest = max(img.shape[-2:])
    if longest < size:
        factor = math.ceil(size / longest)
        return img.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    if longest > 4 * size:
        scale = 4 * size / longest
        hw = [max(1, round(s * scale)) for s in img.shape[-2:]]
        return F.interpolate(img[None], size=hw, mode="area")[0]
    return img


def _image_tile(x: Tensor, size: int) -> Tensor:
    """One input ``[C, H, W]`` or ``[H, W]`` as an RGB tile ``[3, h, w]`` in [0, 1]."""
    img = x.detach().cpu().float()
    if x.dtype == torch.uint8:
        img = img / 255.0
    if img.ndim == 2:
        img = img[None]
    if img.shape[0] == 4:
        img = img[:3]
    elif img.shape[0] == 2:
        img = img.mean(0, keepdim=True)
    lo, hi = img.min(), img.max()
    if lo < 0 or hi > 1:  # standardised data: stretch each image to [0, 1]
        img = (img - lo) / (hi - lo).clamp_min(1e-12)
    return _upscale(img.expand(3, -1, -1).contiguous(), size)


def _saliency_tile(m: Tensor, size: int) -> Tensor:
    """A signed map, summed over channels, as a red (raises the validation loss) / white / blue
    (lowers it) tile, scaled by its largest magnitude."""
    sal = m.detach().cpu().float()
    if sal.ndim == 3:
        sal = sal.sum(0)
    sal = sal / sal.abs().max().clamp_min(1e-30)
    pos, neg = sal.clamp_min(0), (-sal).clamp_min(0)
    rgb = torch.stack([1 - neg, 1 - pos - neg, 1 - pos]).clamp(0, 1)
    return _upscale(rgb, size)


@dataclass
class _Cell:
    """One tile of a figure: a picture (or none), its frame colour and a caption."""

    tile: Tensor | None
    color: _Color = _NEUTRAL
    caption: str = ""


def _caption(e: _Example, score: str = "{:+.3g}") -> str:
    return f"#{e.index} y={e.label} ŷ={e.prediction}\n" + score.format(e.score)


def _panel_figure(panel: _Panel) -> Tensor:
    """One row of helpful and one of harmful training images (each with its saliency row below
    when computed), the validation image at the top left."""
    v = panel.val
    loss = "" if math.isnan(v.score) else f" loss {v.score:.3g}"
    with_maps = any(e.saliency is not None for e in panel.helpful + panel.harmful)
    rows: list[list[_Cell]] = []
    labels: list[tuple[str, _Color]] = []
    for name, color, examples in (
        ("helpful", _HELPFUL, panel.helpful),
        ("harmful", _HARMFUL, panel.harmful),
    ):
        first = _Cell(v.image, _VALIDATION, f"val #{v.index}{loss}\ny={v.label} ŷ={v.prediction}")
        rows.append([first if not rows else _Cell(None)])
        rows[-1] += [_Cell(e.image, color, _caption(e)) for e in examples]
        labels.append((name, color))
        if with_maps:
            rows.append([_Cell(None)] + [_Cell(e.saliency) for e in examples])
            labels.append(("I_pert,loss", _NEUTRAL))
    title = (
        f"validation example {v.index}: green = helpful (score < 0), red = harmful (score > 0)"
        + ("; I_pert,loss: red pixels raise its loss" if with_maps else "")
    )
    return _figure(rows, labels, title)


def _outliers_figure(outliers: list[_Example], ncols: int = 8) -> Tensor:
    """The training examples with the highest self-influence, framed red where the model's
    prediction disagrees with the given label."""
    cells = [
        _Cell(
            e.image,
            _HARMFUL if e.label != e.prediction else _NEUTRAL,
            _caption(e, "self-infl. {:.3g}"),
        )
        for e in outliers
    ]
    rows = [cells[r : r + ncols] for r in range(0, len(cells), ncols)]
    title = "highest self-influence first (suspected mislabels); red: prediction ≠ given label"
    return _figure(rows, [], title)


def _figure(rows: list[list[_Cell]], labels: list[tuple[str, _Color]], title: str) -> Tensor:
    """Tiles on one canvas built with torch; matplotlib (when importable) adds the captions,
    row labels and title. Without it the canvas is returned as is: colours, no text."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return _grid(rows, top=0, left=0)[0]
    top, left, dpi = 26, 18 if labels else 0, 150
    canvas, spots, starts = _grid(rows, top=top, left=left)
    title = textwrap.fill(title, width=max(20, int(canvas.shape[2] / 5.0)))
    head = 10 + 10 * (title.count("\n") + 1)
    height, width = canvas.shape[1] + head, canvas.shape[2]
    fig = Figure(figsize=(width / 100, height / 100), dpi=dpi)
    agg = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, canvas.shape[1] / height))
    ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    for (x, y), cell in spots:
        if cell.caption:
            ax.text(
                x, y - 2, cell.caption, ha="center", va="bottom", fontsize=5.2, linespacing=1.05
            )
    for r, (label, color) in enumerate(labels):
        y = (starts[r] + starts[r + 1]) / 2
        ax.text(left / 2, y, label, ha="center", va="center", rotation=90, fontsize=6, color=color)
    fig.text(0.5, 1 - 0.5 * head / height, title, ha="center", va="center", fontsize=5.5)
    return _draw(agg)


def _draw(agg: Any) -> Tensor:
    """Render a matplotlib Agg canvas to ``[3, H, W]`` in [0, 1]."""
    agg.draw()
    rgba = np.asarray(agg.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255.0


def _grid(
    rows: list[list[_Cell]], top: int, left: int, pad: int = 6
) -> tuple[Tensor, list[tuple[tuple[float, float], _Cell]], list[int]]:
    """A white canvas with each tile framed in its colour, ``top`` pixels above each tile for a
    caption (rows with captions only) and a ``left`` strip for row labels; returns it with each
    cell's caption anchor and the first pixel row of each row (and the end)."""
    tiles = [c.tile for row in rows for c in row if c.tile is not None]
    h = max((t.shape[1] for t in tiles), default=8)
    w = max((t.shape[2] for t in tiles), default=8)
    cw = w + 2 * pad
    tops = [top if any(c.caption for c in row) else 0 for row in rows]
    starts = [sum(tops[:r]) + r * (h + 2 * pad) for r in range(len(rows) + 1)]
    ncols = max((len(row) for row in rows), default=1)
    canvas = torch.ones(3, starts[-1], left + cw * ncols)
    frame = pad // 2
    spots: list[tuple[tuple[float, float], _Cell]] = []
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell.tile is None:
                continue
            y, x = starts[r] + tops[r] + pad, left + c * cw + pad
            th, tw = cell.tile.shape[1:]
            color = torch.tensor(cell.color)[:, None, None]
            canvas[:, y - frame : y + th + frame, x - frame : x + tw + frame] = color
            canvas[:, y : y + th, x : x + tw] = cell.tile
            spots.append(((x + tw / 2, float(y - frame)), cell))
    return canvas, spots, starts


def _histogram_figure(histograms: dict[str, Tensor]) -> Tensor | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    if not histograms:
        return None
    fig = Figure(figsize=(4.0 * len(histograms), 3.0), dpi=100)
    agg = FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(histograms), squeeze=False)[0]
    for ax, (name, values) in zip(axes, histograms.items(), strict=True):
        ax.hist(values.numpy(), bins=50, color=_VALIDATION)
        ax.set_yscale("log")
        ax.set_title(name.replace("_", "-"), fontsize=9)
        ax.set_xlabel(_HISTOGRAM_AXES.get(name, name), fontsize=8)
        ax.set_ylabel(
            "examples (log scale)" if name != "scores" else "pairs (log scale)", fontsize=8
        )
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _draw(agg)


def _to_uint8(img: Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] -> ``[H, W, 3]`` uint8."""
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _panel_markdown(panel: _Panel, text_inputs: bool) -> str:
    v = panel.val
    loss = "" if math.isnan(v.score) else f", loss {v.score:.4g}"
    lines = [
        f"**Validation example {v.index}**: label {v.label}, predicted {v.prediction}{loss}.",
        "Score = I_up,loss: negative = helpful, positive = harmful.",
        "",
    ]
    if text_inputs:
        lines[1:1] = [f"Input: `{_md_escape(v.text)}`"]
    head = "| kind | rank | train index | label | prediction | score |"
    rule = "| --- | ---: | ---: | --- | --- | ---: |"
    if text_inputs:
        head, rule = head + " input |", rule + " --- |"
    lines += [head, rule]
    for kind, rank, e in panel.rows():
        row = f"| {kind} | {rank} | {e.index} | {e.label} | {e.prediction} | {e.score:+.4g} |"
        lines.append(row + (f" `{_md_escape(e.text)}` |" if text_inputs else ""))
    return "\n".join(lines)


def _outliers_markdown(outliers: list[_Example], text_inputs: bool) -> str:
    lines = [
        "**Highest self-influence**: review these training labels first.",
        "",
        "| rank | index | given label | predicted label | self-influence |"
        + (" input |" if text_inputs else ""),
        "| ---: | ---: | --- | --- | ---: |" + (" --- |" if text_inputs else ""),
    ]
    for rank, e in enumerate(outliers, start=1):
        row = f"| {rank} | {e.index} | {e.label} | {e.prediction} | {e.score:.4g} |"
        lines.append(row + (f" `{_md_escape(e.text)}` |" if text_inputs else ""))
    return "\n".join(lines)


def _summary_markdown(result: InfluenceResult) -> str:
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


def _write_outliers_csv(report: _Report, path: Path) -> Path | None:
    """The review list: one row per suspected mislabel, highest self-influence first."""
    if not report.outliers:
        return None
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        text = not report.images  # inputs shown as text go in the table too
        header = ["rank", "index", "given_label", "predicted_label", "self_influence"]
        writer.writerow(header + (["input"] if text else []))
        for rank, e in enumerate(report.outliers, start=1):
            row = [rank, e.index, e.label, e.prediction, repr(e.score)]
            writer.writerow(row + ([e.text] if text else []))
    return path


def _write_rankings_csv(report: _Report, path: Path) -> Path | None:
    if not report.panels:
        return None
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        text = not report.images  # inputs shown as text go in the table too
        writer.writerow([*_RANKING_COLUMNS, *(("val_input", "input") if text else ())])
        for panel in report.panels:
            v = panel.val
            for kind, rank, e in panel.rows():
                row = [v.index, v.label, v.prediction, kind, rank, e.index, e.label, e.prediction]
                writer.writerow([*row, repr(e.score), *((v.text, e.text) if text else ())])
    return path


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


def _log_tensorboard(writer: Any, report: _Report, prefix: str, step: int) -> None:
    """Images, markdown tables, histograms and scalars under ``prefix/`` in a ``SummaryWriter``."""
    text_inputs = not report.images
    for panel in report.panels:
        tag = f"{prefix}/val_{panel.val.index}"
        if panel.figure is not None:
            writer.add_image(tag, panel.figure, step, dataformats="CHW")
        writer.add_text(tag, _panel_markdown(panel, text_inputs), step)
    if report.outliers:
        if report.outliers_figure is not None:
            writer.add_image(f"{prefix}/outliers", report.outliers_figure, step, dataformats="CHW")
        table = _outliers_markdown(report.outliers, text_inputs)
        writer.add_text(f"{prefix}/outliers", table, step)
    writer.add_text(f"{prefix}/summary", report.summary, step)
    for name, values in report.histograms.items():
        writer.add_histogram(f"{prefix}/{name}", values, step)
    for name, value in report.scalars.items():
        writer.add_scalar(f"{prefix}/{name}", value, step)
    writer.flush()


def _log_wandb(run: Any, report: _Report, prefix: str, result_path: Path | None, step: int) -> None:
    """Tables with image cells, the panel images, histograms, summary values and an artifact."""
    import wandb  # optional dependency: imported only when a WandbLogger is present

    def picture(img: Tensor | None, caption: str = "") -> Any:
        return None if img is None else wandb.Image(_to_uint8(img), caption=caption or None)

    text_inputs = not report.images
    logged: dict[str, Any] = {}
    if report.panels:
        columns: list[str | int] = ["val_index", "val_label", "val_prediction", "kind", "rank"]
        columns += ["train_index"]
        columns += ["label", "prediction", "score"]
        columns += ["val_input", "input"] if text_inputs else ["image", "saliency"]
        table = wandb.Table(columns=columns)
        for panel in report.panels:
            v = panel.val
            for kind, rank, e in panel.rows():
                row = [v.index, v.label, v.prediction, kind, rank, e.index, e.label, e.prediction]
                row.append(e.score)
                row += [v.text, e.text] if text_inputs else [picture(e.image), picture(e.saliency)]
                table.add_data(*row)
        logged[f"{prefix}/rankings"] = table
        for panel in report.panels:
            if panel.figure is not None:
                logged[f"{prefix}/val_{panel.val.index}"] = picture(
                    panel.figure, f"validation example {panel.val.index}"
                )
    if report.outliers:
        columns = ["rank", "index", "given_label", "predicted_label", "self_influence"]
        columns.append("input" if text_inputs else "image")
        table = wandb.Table(columns=columns)
        for rank, e in enumerate(report.outliers, start=1):
            cell = e.text if text_inputs else picture(e.image)
            table.add_data(rank, e.index, e.label, e.prediction, e.score, cell)
        logged[f"{prefix}/outliers"] = table
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


def _write_png(img: Tensor, path: Path) -> Path:
    from PIL import Image  # pillow ships with tensorboard

    Image.fromarray(_to_uint8(img)).save(path)
    return path


def _write_files(report: _Report, out_dir: Path, stem: str) -> list[Path]:
    """PNG images, a markdown report with the tables, and the diagnostics as JSON."""
    files: list[Path] = []
    text_inputs = not report.images
    sections = [f"# Influence report\n\n{report.summary}"]
    for panel in report.panels:
        section = _panel_markdown(panel, text_inputs)
        if panel.figure is not None:
            png = _write_png(panel.figure, out_dir / f"{stem}_val_{panel.val.index}.png")
            files.append(png)
            section = f"![validation example {panel.val.index}]({png.name})\n\n{section}"
        sections.append(f"## Validation example {panel.val.index}\n\n{section}")
    if report.outliers:
        section = _outliers_markdown(report.outliers, text_inputs)
        if report.outliers_figure is not None:
            png = _write_png(report.outliers_figure, out_dir / f"{stem}_outliers.png")
            files.append(png)
            section = f"![outliers]({png.name})\n\n{section}"
        sections.append(f"## Self-influence outliers\n\n{section}")
    hist = _histogram_figure(report.histograms)
    if hist is not None:
        png = _write_png(hist, out_dir / f"{stem}_histograms.png")
        files.append(png)
        sections.append(f"## Histograms\n\n![histograms]({png.name})")
    md = out_dir / f"{stem}.md"
    md.write_text("\n\n".join(sections) + "\n")
    diag = out_dir / f"{stem}_diagnostics.json"
    diag.write_text(json.dumps(report.scalars, indent=2) + "\n")
    return [*files, md, diag]
