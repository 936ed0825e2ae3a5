"""Pixels without a plotting library: PNG files written with zlib, text drawn with Pillow.

Figures are composed as arrays and lettered in DejaVu Sans, the font matplotlib installs (the
``[examples]`` extra), found without importing matplotlib; without it there is no font, and the
figures carry no text. Drawing text this way costs microseconds where a plotting library's layout
costs milliseconds.
"""

from __future__ import annotations

import functools
import importlib.util
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image, ImageFont

__all__ = ["Lettering", "encode_png", "font", "to_uint8", "write_png"]

Color = tuple[float, ...]


def to_uint8(img: Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] (or uint8, kept as it is) -> ``[H, W, 3]`` uint8.

    Example:
        >>> to_uint8(torch.tensor([[[0.0, 0.5]], [[1.0, 1.0]], [[0.2, 2.0]]])).tolist()
        [[[0, 255, 51], [128, 255, 255]]]
    """
    if img.dtype == torch.uint8:
        return np.ascontiguousarray(img.detach().cpu().numpy().transpose(1, 2, 0))
    scaled = np.clip(img.detach().cpu().float().numpy(), 0, 1) * 255  # as torch: float32
    return np.ascontiguousarray(np.rint(scaled).astype(np.uint8).transpose(1, 2, 0))


def encode_png(rgb: np.ndarray, level: int = 1) -> bytes:
    """``[H, W, 3]`` uint8 as the bytes of an 8-bit RGB PNG, deflated at ``level`` (1: fast;
    images of upscaled pixels and white space shrink well even so).

    Example:
        >>> encode_png(np.zeros((2, 3, 3), np.uint8))[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    height, width = rgb.shape[:2]
    rows = np.zeros((height, 1 + 3 * width), np.uint8)  # a leading 0 per row: no filter
    rows[:, 1:] = np.ascontiguousarray(rgb, np.uint8).reshape(height, -1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", header),
            chunk(b"IDAT", zlib.compress(rows.tobytes(), level)),
            chunk(b"IEND", b""),
        )
    )


def write_png(img: Tensor | np.ndarray, path: Path) -> Path:
    """Save ``[3, H, W]`` (in [0, 1], or uint8) or ``[H, W, 3]`` uint8 as a PNG file."""
    rgb = to_uint8(img) if isinstance(img, Tensor) else img
    path.write_bytes(encode_png(rgb))
    return path


def _font_file() -> Path | None:
    """DejaVu Sans as matplotlib installs it, or ``None`` (matplotlib missing or unimportable).
    Looked up on each call (a few microseconds): whether matplotlib is there may change."""
    try:
        spec = importlib.util.find_spec("matplotlib")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return path
    return None


@functools.cache
def _load(path: Path, size: float) -> ImageFont.FreeTypeFont | None:
    from PIL import ImageFont

    try:
        return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.BASIC)
    except OSError:  # Pillow built without FreeType
        return None


def font(points: float, dpi: float) -> ImageFont.FreeTypeFont | None:
    """DejaVu Sans at ``points`` for ``dpi`` pixels per inch, or ``None`` when not installed.

    Example:
        >>> f = font(10, 72)
        >>> f is None or f.size == 10
        True
    """
    path = _font_file()
    return None if path is None else _load(path, round(points * dpi / 72, 2))


class Lettering:
    """Text on an ``[H, W, 3]`` uint8 image, anchored as matplotlib anchors it; ``pixels`` holds
    the result (one copy in, one out).

    Example:
        >>> board = Lettering(np.full((20, 60, 3), 255, np.uint8))
        >>> f = font(8, 100)
        >>> _ = f is None or board.text(30, 10, "12", f)
        >>> board.pixels.shape
        (20, 60, 3)
    """

    def __init__(self, pixels: np.ndarray) -> None:
        from PIL import Image, ImageDraw

        self.image: Image.Image = Image.fromarray(pixels)
        self._draw = ImageDraw.Draw(self.image)

    def text(
        self,
        x: float,
        y: float,
        text: str,
        face: ImageFont.FreeTypeFont,
        color: Color = (0.0, 0.0, 0.0),
        anchor: str = "mm",
        rotate: bool = False,
        spacing: float = 1.0,
    ) -> None:
        """``text`` at ``(x, y)``: ``anchor`` is horizontal ``l``/``m``/``r`` then vertical
        ``a`` (top) / ``m`` / ``d`` (bottom); lines centred on each other; ``rotate`` turns it a
        quarter counter-clockwise (then ``anchor`` applies to the turned box)."""
        fill = tuple(round(c * 255) for c in color)
        if not rotate:
            self._draw.multiline_text(
                (x, y), text, fill=fill, font=face, anchor=anchor, spacing=spacing, align="center"
            )
            return
        from PIL import Image, ImageDraw

        left, top, right, bottom = self._draw.multiline_textbbox(
            (0, 0), text, font=face, anchor="la", spacing=spacing
        )
        mask = Image.new("L", (int(right - left) + 2, int(bottom - top) + 2))
        ImageDraw.Draw(mask).multiline_text(
            (1 - left, 1 - top), text, fill=255, font=face, spacing=spacing, align="center"
        )
        mask = mask.transpose(Image.Transpose.ROTATE_90)
        w, h = mask.size
        dx = {"l": 0.0, "m": w / 2, "r": float(w)}[anchor[0]]
        dy = {"a": 0.0, "m": h / 2, "d": float(h)}[anchor[1]]
        self.image.paste(fill, (round(x - dx), round(y - dy)), mask)

    def width(self, text: str, face: ImageFont.FreeTypeFont) -> float:
        """Width in pixels of ``text`` (its longest line)."""
        return max(face.getlength(line) for line in text.split("\n"))

    @property
    def pixels(self) -> np.ndarray:
        return np.asarray(self.image)
