"""Histograms as one picture: a panel per distribution, counts on a log scale, drawn with numpy.

Bars, axes and ticks are array slices; titles, labels and tick labels are lettered by
:mod:`.lettering`. Without its font (a Pillow built without FreeType) there is no picture: the
loggers keep their own histograms of the same values.
"""

from __future__ import annotations

import math
import textwrap
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from lightning_influence.report.lettering import Lettering, font, text_width

if TYPE_CHECKING:
    from PIL.ImageFont import FreeTypeFont

__all__ = ["histogram_figure"]

_AXES = {
    "scores": "score of a (training, validation) pair: < 0 helped, > 0 hurt",
    "log10_self_influence": "log10 of self-influence (how much an example shapes its own loss)",
}
_BAR = np.array([31, 120, 181], np.uint8)  # (0.12, 0.47, 0.71)
_WIDTH, _HEIGHT, _DPI = 400, 300, 100  # one panel, in pixels
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 12, 26, 62  # margins around the axes
_TICK, _MINOR, _PAD = 5, 3, 3  # tick lengths and the gap to their labels
_SUPERSCRIPT = str.maketrans(
    "-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079"
)


def histogram_figure(histograms: dict[str, Tensor], bins: int = 50) -> Tensor | None:
    """One panel per ``name: values`` (``bins`` bars, counts on a log scale) side by side, as
    ``[3, H, W]`` uint8; ``None`` when there is nothing to show or no font to label it.

    Example:
        >>> fig = histogram_figure({"scores": torch.randn(1000)})
        >>> fig is None or tuple(fig.shape) == (3, 300, 400)
        True
    """
    title, label, tick = (font(points, _DPI) for points in (9, 8, 7))
    if not histograms or title is None or label is None or tick is None:
        return None
    pixels = np.full((_HEIGHT, _WIDTH * len(histograms), 3), 255, np.uint8)
    board = Lettering(pixels)
    for n, (name, values) in enumerate(histograms.items()):
        xticks, yticks = _bars(pixels[:, n * _WIDTH : (n + 1) * _WIDTH], values.numpy(), bins)
        x0, x1, y1 = n * _WIDTH + _LEFT, (n + 1) * _WIDTH - _RIGHT, _HEIGHT - _BOTTOM
        board.text((x0 + x1) / 2, _TOP - 7, name.replace("_", "-"), title, anchor="md")
        for x, text in xticks:
            board.text(n * _WIDTH + x, y1 + _TICK + _PAD, text, tick, anchor="ma")
        widest = 0.0
        for y, text in yticks:
            board.text(x0 - _TICK - _PAD, y, text, tick, anchor="rm")
            widest = max(widest, text_width(text, tick))
        xlabel = _wrap(_AXES.get(name, name), label, _WIDTH - _LEFT + _RIGHT - 4)
        board.text((x0 + x1) / 2, y1 + _TICK + _PAD + 16, xlabel, label, anchor="ma")
        ylabel = "pairs (log scale)" if name == "scores" else "examples (log scale)"
        middle = (_TOP + y1) / 2
        board.text(x0 - _TICK - 2 * _PAD - widest, middle, ylabel, label, anchor="rm", rotate=True)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _bars(
    panel: np.ndarray, values: np.ndarray, bins: int
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """Draw the bars, axes and ticks of one panel in place; returns where the tick labels go:
    ``[(x, text)]`` below the axes and ``[(y, text)]`` beside them, in panel pixels."""
    counts, edges = np.histogram(values, bins=bins)
    x0, x1, y0, y1 = _LEFT, _WIDTH - _RIGHT, _TOP, _HEIGHT - _BOTTOM
    lo, hi = float(edges[0]), float(edges[-1])
    span = hi - lo or 1.0
    lo, hi = lo - 0.05 * span, hi + 0.05 * span  # matplotlib's default margins
    positive = counts[counts > 0]
    top, bottom = (math.log10(positive.max()), 0.0) if positive.size else (1.0, 0.0)
    bottom = min(bottom, math.log10(positive.min())) if positive.size else bottom
    margin = 0.05 * (top - bottom) or 0.5
    bottom, top = bottom - margin, top + margin

    def px(v: float | np.ndarray) -> np.ndarray:
        return np.round(x0 + (np.asarray(v) - lo) / (hi - lo) * (x1 - x0)).astype(int)

    def py(c: float | np.ndarray) -> np.ndarray:
        return np.round(y1 - (np.log10(c) - bottom) / (top - bottom) * (y1 - y0)).astype(int)

    xs = px(edges)
    for left, right, count in zip(xs[:-1], xs[1:], counts.tolist(), strict=True):
        if count > 0:
            panel[max(int(py(count)), y0) : y1, left : max(right, left + 1)] = _BAR
    panel[y0 : y1 + 1, [x0, x1]] = 0  # the frame
    panel[[y0, y1], x0 : x1 + 1] = 0
    xticks = []
    ticks, target = _ticks(lo, hi), 8
    while target > 2 and sum(7 * len(t) + 8 for _, t in ticks) > x1 - x0:  # labels would touch
        target //= 2
        ticks = _ticks(lo, hi, target)
    for v, text in ticks:
        x = int(px(v))
        panel[y1 : y1 + _TICK + 1, x] = 0
        xticks.append((x, text))
    yticks = []
    for decade in range(math.floor(bottom), math.ceil(top) + 1):
        for sub in range(1, 10):
            c = sub * 10.0**decade
            if not bottom <= math.log10(c) <= top:
                continue
            y = int(py(c))
            panel[y, x0 - (_TICK if sub == 1 else _MINOR) : x0] = 0
            if sub == 1:
                yticks.append((y, "10" + str(decade).translate(_SUPERSCRIPT)))
    return xticks, yticks


def _ticks(lo: float, hi: float, target: int = 8) -> list[tuple[float, str]]:
    """Round values between ``lo`` and ``hi``, about ``target`` of them, 1, 2, 2.5 or 5 apart
    (times a power of ten), with their labels: as many digits as the step needs, and a true
    minus sign, as matplotlib writes them.

    Example:
        >>> [text for _, text in _ticks(-950.0, 420.0)]
        ['\u2212800', '\u2212600', '\u2212400', '\u2212200', '0', '200', '400']
        >>> [text for _, text in _ticks(12344.1, 12344.9)][:3], _ticks(0.0, 1e-6)[1][1]
        (['12344.1', '12344.2', '12344.3'], '2e-07')
    """
    raw = (hi - lo) / target
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(s * power for s in (1, 2, 2.5, 5, 10) if s * power >= raw)
    largest = math.floor(math.log10(max(abs(lo), abs(hi))))
    digits = max(largest - math.floor(math.log10(step)) + 2, largest + 1, 1)
    ticks = []
    for k in range(math.ceil(lo / step), math.floor(hi / step) + 1):
        text = f"{k * step:.{digits}g}" if k else "0"
        ticks.append((k * step, text.replace("-", "\u2212", 1) if k < 0 else text))
    return ticks


def _wrap(text: str, face: FreeTypeFont, width: float) -> str:
    """``text`` wrapped into lines no wider than ``width`` pixels."""
    for chars in range(len(text), 10, -4):
        wrapped = textwrap.fill(text, chars)
        if text_width(wrapped, face) <= width:
            return wrapped
    return textwrap.fill(text, 10)
