"""Pictures: tiles with torch, annotated figures composed as arrays, lettered by :mod:`.lettering`.

Small images are upscaled with nearest-neighbour interpolation so that 8x8 digits stay legible.
Figures carry the dataset index, label, prediction and score above each tile, framed by colour
(blue: the validation example, green: helpful, red: harmful); without a font (a Pillow built
without FreeType, see :mod:`.lettering`) they are plain grids, and the text lives in the tables
beside them.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_influence.report.lettering import Lettering, font
from lightning_influence.report.raster import quantize

if TYPE_CHECKING:
    from lightning_influence.report.model import Example, Panel

__all__ = [
    "image_tile",
    "image_tiles",
    "outliers_figure",
    "panel_figure",
    "saliency_tiles",
]

_Color = tuple[float, ...]
_HELPFUL: _Color = (0.13, 0.55, 0.13)
_HARMFUL: _Color = (0.84, 0.15, 0.16)
_VALIDATION: _Color = (0.12, 0.47, 0.71)
_NEUTRAL: _Color = (0.6, 0.6, 0.6)


def _upscale(img: Tensor, size: int) -> Tensor:
    """Nearest-neighbour upscaling of uint8 ``[N, h, w, 3]`` so that the longer side is at least
    ``size``; larger images are shrunk (area) to ``4 * size`` at most."""
    n, h, w = img.shape[:3]
    if max(h, w) < size:
        factor = math.ceil(size / max(h, w))
        blocks = img[:, :, None, :, None].expand(n, h, factor, w, factor, 3)
        return blocks.reshape(n, h * factor, w * factor, 3)
    if max(h, w) > 4 * size:
        scale = 4 * size / max(h, w)
        hw = [max(1, round(s * scale)) for s in (h, w)]
        out = F.interpolate(img.permute(0, 3, 1, 2).float(), size=hw, mode="area")
        return out.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return img.contiguous()


def image_tile(x: Tensor, size: int) -> Tensor:
    """One input ``[C, H, W]`` or ``[H, W]`` as an RGB tile ``[3, h, w]``, uint8 (its bytes laid
    out ``[h, w, 3]``, as image files and figures take them)."""
    return image_tiles(x[None], size)[0]


def image_tiles(inputs: Tensor, size: int) -> Tensor:
    """:func:`image_tile` of each input of a batch ``[N, C, H, W]`` or ``[N, H, W]``, at once:
    ``[N, 3, h, w]``; standardised images (values outside [0, 1]) are stretched to [0, 1] each.

    Example:
        >>> image_tiles(torch.tensor([[[0.0, 1.0]], [[-1.0, 3.0]]]), 4)[:, 0, 0].tolist()
        [[0, 0, 255, 255], [0, 0, 255, 255]]
    """
    img = inputs.detach().cpu().float()
    if inputs.dtype == torch.uint8:
        img = img / 255.0
    if img.ndim == 3:
        img = img[:, None]
    if img.shape[1] == 4:
        img = img[:, :3]
    elif img.shape[1] == 2:
        img = img.mean(1, keepdim=True)
    lo = img.amin(dim=(1, 2, 3), keepdim=True)
    hi = img.amax(dim=(1, 2, 3), keepdim=True)
    stretch = (lo < 0) | (hi > 1)  # standardised data: stretch each image to [0, 1]
    img = torch.where(stretch, (img - lo) / (hi - lo).clamp_min(1e-12), img)
    rgb = quantize(img).expand(-1, 3, -1, -1).permute(0, 2, 3, 1)  # enlarged as bytes
    return _upscale(rgb, size).permute(0, 3, 1, 2)


def saliency_tiles(maps: Tensor, size: int) -> Tensor:
    """Signed maps ``[N, C, H, W]`` (summed over channels) or ``[N, H, W]`` as red (raises the
    validation loss) / white / blue (lowers it) tiles ``[N, 3, h, w]``, uint8, each scaled by its
    largest magnitude (laid out ``[N, h, w, 3]``, as :func:`image_tile`).

    Example:
        >>> saliency_tiles(torch.tensor([[[1.0, -0.5]]]), 4)[0, :, 0].tolist()
        [[255, 255, 128, 128], [0, 0, 128, 128], [0, 0, 255, 255]]
    """
    sal = maps.detach().cpu().float()
    if sal.ndim == 4:
        sal = sal.sum(1)
    sal = sal / sal.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    pos, neg = sal.clamp_min(0), (-sal).clamp_min(0)
    rgb = torch.stack([1 - neg, 1 - pos - neg, 1 - pos], dim=-1)
    return _upscale(quantize(rgb), size).permute(0, 3, 1, 2)


@dataclass
class _Cell:
    """One tile of a figure: a picture (or none), its frame colour and a caption."""

    tile: Tensor | None
    color: _Color = _NEUTRAL
    caption: str = ""


def _caption(e: Example, score: str = "{:+.3g}") -> str:
    return f"#{e.index}  {score.format(e.score)}\nlabel {e.label} pred {e.prediction}"


def panel_figure(panel: Panel) -> Tensor:
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
        first = _Cell(
            v.image, _VALIDATION, f"val #{v.index}{loss}\nlabel {v.label} pred {v.prediction}"
        )
        rows.append([first if not rows else _Cell(None)])
        rows[-1] += [_Cell(e.image, color, _caption(e)) for e in examples]
        labels.append((name, color))
        if with_maps:
            rows.append([_Cell(None)] + [_Cell(e.saliency) for e in examples])
            labels.append(("raise loss", _NEUTRAL))
    title = (
        f"validation example {v.index}: green = helpful training examples (they lower its loss), "
        "red = harmful (they raise it)"
        + ("; under each, red pixels are those that raise this loss" if with_maps else "")
    )
    return _figure(rows, labels, title)


def outliers_figure(outliers: list[Example], median: float, ncols: int = 8) -> Tensor:
    """The training examples with the highest self-influence, framed red where the model's
    prediction disagrees with the given label."""
    cells = [
        _Cell(
            e.image,
            _HARMFUL if e.label != e.prediction else _NEUTRAL,
            _caption(e, f"{e.score / median:.3g}x" if median > 0 else "{:.3g}"),
        )
        for e in outliers
    ]
    rows = [cells[r : r + ncols] for r in range(0, len(cells), ncols)]
    title = (
        "highest self-influence first (12x: 12 times the median): review these labels; red "
        "frame: the model predicts another label than the one given"
    )
    return _figure(rows, [], title)


_SCALE = 1.5  # figure pixels per canvas pixel: text of a few points beside legible tiles
_DPI = 150  # the figures' pixels per inch, which sets the size of their text


def _figure(rows: list[list[_Cell]], labels: list[tuple[str, _Color]], title: str) -> Tensor:
    """Tiles framed in their colours, enlarged ``_SCALE`` times (nearest), under a title, with
    captions and row labels, when a font is installed (:mod:`.lettering`), as ``[3, H, W]``
    uint8. Without a font the grid is returned at its own scale: colours, no text."""
    caption_font, label_font, title_font = (font(p, _DPI) for p in (5.2, 6.0, 5.5))
    if caption_font is None or label_font is None or title_font is None:
        return torch.from_numpy(_paint(_Grid(rows, top=0, left=0), 1.0, 0)).permute(2, 0, 1)
    top, left = 26, 18 if labels else 0
    grid = _Grid(rows, top=top, left=left)
    title = textwrap.fill(title, width=max(20, int(grid.width / 5.0)))
    head = 10 + 10 * (title.count("\n") + 1)
    pixels = _paint(grid, _SCALE, head)
    board = Lettering(pixels)
    for y, x, tile, cell in grid.cells:
        if cell.caption:
            at = ((x + tile.shape[2] / 2) * _SCALE, (head + y - grid.frame - 2) * _SCALE)
            board.text(*at, cell.caption, caption_font, anchor="md")
    starts = grid.starts
    for r, (label, color) in enumerate(labels):
        middle = (head + (starts[r] + starts[r + 1]) / 2) * _SCALE
        board.text(left / 2 * _SCALE, middle, label, label_font, color, rotate=True)
    board.text(pixels.shape[1] / 2, head / 2 * _SCALE, title, title_font)
    return torch.from_numpy(pixels).permute(2, 0, 1)


class _Grid:
    """Where each tile goes on a canvas of ``height`` x ``width`` pixels: cells of the tallest
    and widest tile plus ``pad`` on each side, ``top`` pixels above each tile for a caption (rows
    with captions only) and a ``left`` strip for row labels. ``cells`` holds each tile's top left
    corner; ``starts`` the first pixel row of each row (and the end)."""

    def __init__(self, rows: list[list[_Cell]], top: int, left: int, pad: int = 6) -> None:
        tiles = [c.tile for row in rows for c in row if c.tile is not None]
        h = max((t.shape[1] for t in tiles), default=8)
        w = max((t.shape[2] for t in tiles), default=8)
        tops = [top if any(c.caption for c in row) else 0 for row in rows]
        self.starts = [sum(tops[:r]) + r * (h + 2 * pad) for r in range(len(rows) + 1)]
        ncols = max((len(row) for row in rows), default=1)
        self.height, self.width = self.starts[-1], left + (w + 2 * pad) * ncols
        self.frame = pad // 2
        self.cells = [
            (self.starts[r] + tops[r] + pad, left + c * (w + 2 * pad) + pad, tile, cell)
            for r, row in enumerate(rows)
            for c, cell in enumerate(row)
            if (tile := cell.tile) is not None
        ]


def _paint(grid: _Grid, scale: float, head: int) -> np.ndarray:
    """The grid's frames and tiles on white ``[H, W, 3]`` uint8, enlarged ``scale`` times
    (nearest: each pixel shows the grid pixel under its centre), below ``head`` white grid rows.
    Only the tiles are resampled: the frames and the white around them are filled."""
    out_head = round(head * scale)
    out_h, out_w = round((grid.height + head) * scale), round(grid.width * scale)
    out = np.full((out_h, out_w, 3), 255, np.uint8)

    def span(a: int, b: int) -> tuple[int, int]:  # the pixels whose centres fall in [a, b)
        return math.ceil(a * scale - 0.5), math.ceil(b * scale - 0.5)

    for y, x, chw, cell in grid.cells:
        tile = chw.permute(1, 2, 0).numpy()
        th, tw = tile.shape[:2]
        (y0, y1), (x0, x1) = (
            span(y - grid.frame, y + th + grid.frame),
            span(x - grid.frame, x + tw + grid.frame),
        )
        out[out_head + y0 : out_head + y1, x0:x1] = [round(c * 255) for c in cell.color]
        (y0, y1), (x0, x1) = span(y, y + th), span(x, x + tw)
        rows = ((np.arange(y0, y1) + 0.5) / scale).astype(int) - y
        cols = ((np.arange(x0, x1) + 0.5) / scale).astype(int) - x
        out[out_head + y0 : out_head + y1, x0:x1] = tile.take(rows, axis=0).take(cols, axis=1)
    return out
