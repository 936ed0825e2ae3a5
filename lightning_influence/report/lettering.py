"""Text on ``[H, W, 3]`` uint8 pixel arrays: each glyph rasterized once by Pillow, then placed
with numpy.

The font is the scalable one built into Pillow (Aileron Regular, ``ImageFont.load_default``), a
dependency of the package, so figures are lettered in every install; :func:`font` gives ``None``
only for a Pillow built without FreeType, and figures then carry no text. Characters the font
lacks are written as their nearest ASCII (a minus sign as a hyphen). A caption costs tens of
microseconds this way, where a plotting library's text layout costs milliseconds.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL.ImageFont import FreeTypeFont

__all__ = ["Lettering", "font", "text_width"]

Color = tuple[float, ...]
_MARGIN = 2  # pixels around a block of text, for glyphs that reach past their advance
_SPACING = 1  # pixels between lines, beyond the distance between baselines
_ASCII = {
    "\u2212": "-",
    "\u2013": "-",
    "\u2014": "-",
    "\u00d7": "x",
    "\u2264": "<=",
    "\u2265": ">=",
}
"""What to write for characters the font may lack."""
_SUPERSCRIPT = dict(
    zip(
        "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079",
        "-0123456789",
        strict=True,
    )
)
"""Superscripts the font may lack, drawn as their characters made smaller and raised."""


@functools.cache
def _load(size: float) -> FreeTypeFont | None:
    from PIL import ImageFont

    face = ImageFont.load_default(size=size)
    return face if isinstance(face, ImageFont.FreeTypeFont) else None  # Pillow without FreeType


def font(points: float, dpi: float) -> FreeTypeFont | None:
    """Pillow's scalable font at ``points`` for ``dpi`` pixels per inch, or ``None`` when Pillow
    has no FreeType.

    Example:
        >>> f = font(10, 72)
        >>> f is None or f.size == 10
        True
    """
    return _load(round(points * dpi / 72, 2))


@functools.cache
def _has(face: FreeTypeFont, char: str) -> bool:
    """Whether ``face`` has a glyph for ``char`` (not its missing-glyph box)."""
    mask, missing = face.getmask(char), face.getmask("\ue000")  # a private-use code point
    return char.isspace() or (mask.size, bytes(mask)) != (missing.size, bytes(missing))


def _writable(face: FreeTypeFont, text: str) -> str:
    """``text`` with the characters ``face`` lacks replaced by their ASCII forms."""
    return "".join(c if c not in _ASCII or _has(face, c) else _ASCII[c] for c in text)


@functools.cache
def _glyph(face: FreeTypeFont, char: str) -> tuple[np.ndarray, int, int, float]:
    """The coverage of ``char`` in [0, 1], where its top left lies from the pen on the baseline,
    and how far the pen then moves. A superscript the font lacks is its digit (or minus) drawn
    smaller and raised."""
    from PIL import Image, ImageDraw

    if char in _SUPERSCRIPT and not _has(face, char):
        small = _load(round(face.size * 0.7, 2))
        if small is not None:
            mask, left, top, advance = _glyph(small, _SUPERSCRIPT[char])
            lift = round(0.45 * -face.getbbox("0", anchor="ls")[1])  # of a digit's height
            return mask, left, top - lift, advance

    left, top, right, bottom = (int(v) for v in face.getbbox(char, anchor="ls"))
    advance = float(face.getlength(char))
    if right <= left or bottom <= top:  # a space
        return np.zeros((0, 0), np.float32), 0, 0, advance
    image = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(image).text((-left, -top), char, font=face, fill=255, anchor="ls")
    return np.asarray(image, np.float32) / 255, left, top, advance


@functools.cache
def _metrics(face: FreeTypeFont) -> tuple[int, int, int]:
    """Ascent, descent and the distance between baselines (as Pillow spaces lines, less its
    ``spacing``)."""
    ascent, descent = face.getmetrics()
    return ascent, descent, int(face.getbbox("A", anchor="la")[3])


def text_width(text: str, face: FreeTypeFont) -> float:
    """Width in pixels of ``text`` (its longest line) as :class:`Lettering` writes it.

    Example:
        >>> f = font(10, 72)
        >>> f is None or text_width("ab\\na", f) == text_width("ab", f) > text_width("a", f)
        True
    """
    return max(_line(face, line)[1] for line in text.split("\n"))


class Lettering:
    """Writes text into ``pixels`` (``[H, W, 3]`` uint8, changed in place), anchored as
    matplotlib anchors it.

    Example:
        >>> pixels = np.full((20, 60, 3), 255, np.uint8)
        >>> f = font(8, 100)
        >>> Lettering(pixels).text(30, 10, "12", f) if f else None
        >>> f is None or int(pixels.min()) < 100
        True
    """

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels

    def text(
        self,
        x: float,
        y: float,
        text: str,
        face: FreeTypeFont,
        color: Color = (0.0, 0.0, 0.0),
        anchor: str = "mm",
        rotate: bool = False,
    ) -> None:
        """``text`` at ``(x, y)``: ``anchor`` is horizontal ``l``/``m``/``r`` then vertical
        ``a`` (top) / ``m`` / ``d`` (bottom); lines centred on each other; ``rotate`` turns it a
        quarter counter-clockwise (then ``anchor`` applies to the turned box)."""
        alpha, width, height = _block(text, face)
        if rotate:
            alpha, width, height = np.rot90(alpha), height, width
        left = x - {"l": 0.0, "m": width / 2, "r": width}[anchor[0]]
        top = y - {"a": 0.0, "m": height / 2, "d": height}[anchor[1]]
        self._blend(alpha, round(left) - _MARGIN, round(top) - _MARGIN, color)

    def _blend(self, alpha: np.ndarray, x: int, y: int, color: Color) -> None:
        """Paint ``color`` over the pixels with its top left at ``(x, y)``, by ``alpha``."""
        rows, cols = self.pixels.shape[:2]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + alpha.shape[1], cols), min(y + alpha.shape[0], rows)
        if x1 <= x0 or y1 <= y0:
            return
        a = alpha[y0 - y : y1 - y, x0 - x : x1 - x, None]
        region = self.pixels[y0:y1, x0:x1]
        ink = np.array([c * 255 for c in color], np.float32)
        region[...] = np.rint(region * (1 - a) + ink * a)


def _block(text: str, face: FreeTypeFont) -> tuple[np.ndarray, float, int]:
    """The coverage of ``text`` (lines centred), ``_MARGIN`` pixels around its box, and the
    box's width and height (from the first line's ascender to the last one's descender)."""
    ascent, descent, pitch = _metrics(face)
    lines = [_line(face, line) for line in text.split("\n")]
    width = max(w for _, w in lines)
    height = (len(lines) - 1) * (pitch + _SPACING) + ascent + descent
    alpha = np.zeros((height + 2 * _MARGIN, math.ceil(width) + 2 * _MARGIN), np.float32)
    for n, (line, w) in enumerate(lines):
        x, y = round((width - w) / 2), n * (pitch + _SPACING)
        region = alpha[y : y + line.shape[0], x : x + line.shape[1]]
        np.maximum(region, line[: region.shape[0], : region.shape[1]], out=region)
    return alpha, width, height


@functools.lru_cache(maxsize=4096)  # captions repeat lines: "label 3 pred 3"
def _line(face: FreeTypeFont, text: str) -> tuple[np.ndarray, float]:
    """The coverage of one line, ``_MARGIN`` pixels around its box (top: the ascender), and its
    width."""
    text = _writable(face, text)
    ascent, descent, _ = _metrics(face)
    width = sum(_glyph(face, c)[3] for c in text)
    alpha = np.zeros((ascent + descent + 2 * _MARGIN, math.ceil(width) + 2 * _MARGIN), np.float32)
    pen = float(_MARGIN)
    for char in text:
        mask, left, top, advance = _glyph(face, char)
        if mask.size:
            x, y = round(pen) + left, _MARGIN + ascent + top
            x0, y0 = max(x, 0), max(y, 0)
            region = alpha[y0 : y + mask.shape[0], x0 : x + mask.shape[1]]
            piece = mask[y0 - y : y0 - y + region.shape[0], x0 - x : x0 - x + region.shape[1]]
            np.maximum(region, piece, out=region)
        pen += advance
    return alpha, width
