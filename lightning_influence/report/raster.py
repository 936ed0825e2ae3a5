"""Pictures as bytes: ``[3, H, W]`` tensors to ``[H, W, 3]`` uint8, and PNG files written with
zlib (one call per picture: hundreds of small tiles take milliseconds, not an image library's
per-file overhead), directly or by a background thread (:class:`PngWriter`)."""

from __future__ import annotations

import os
import queue
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["PngWriter", "encode_png", "quantize", "to_uint8", "write_png"]


def quantize(img: Tensor) -> Tensor:
    """Values in [0, 1] (clipped) as uint8, rounded, in float32; uint8 is kept as it is.

    Example:
        >>> quantize(torch.tensor([0.0, 0.2, 0.5, 2.0])).tolist()
        [0, 51, 128, 255]
    """
    if img.dtype == torch.uint8:
        return img
    return (img.float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8(img: Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] (or uint8, kept as it is) -> ``[H, W, 3]`` uint8.

    Example:
        >>> to_uint8(torch.tensor([[[0.0, 0.5]], [[1.0, 1.0]], [[0.2, 2.0]]])).tolist()
        [[[0, 255, 51], [128, 255, 255]]]
    """
    return np.ascontiguousarray(quantize(img.detach().cpu()).numpy().transpose(1, 2, 0))


def encode_png(rgb: np.ndarray, level: int = 1) -> bytes:
    """``[H, W, 3]`` uint8 as the bytes of an 8-bit RGB PNG, deflated at ``level`` (1: fast;
    images of upscaled pixels and white space shrink well even so). Rows of images larger than a
    tile are stored as their difference to the row above (PNG's "Up" filter): in figures most
    rows repeat the one above, and long runs of zeros deflate faster and smaller.

    Example:
        >>> encode_png(np.zeros((2, 3, 3), np.uint8))[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    height, width = rgb.shape[:2]
    pixels = np.ascontiguousarray(rgb, np.uint8).reshape(height, -1)
    rows = np.zeros((height, 1 + 3 * width), np.uint8)  # a leading 0 per row: no filter
    rows[:, 1:] = pixels
    if height * width > 128 * 128:
        rows[1:, 0] = 2  # "Up"
        np.subtract(pixels[1:], pixels[:-1], out=rows[1:, 1:])  # modulo 256, as PNG wants

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
    _write(path, _png(img))
    return path


def _png(img: Tensor | np.ndarray) -> bytes:
    return encode_png(to_uint8(img) if isinstance(img, Tensor) else img)


def _write(path: Path, data: bytes) -> None:
    """``data`` into a new file at ``path``, through ``os`` (fewer system calls than ``open``:
    hundreds of small files)."""
    view = memoryview(data)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


class PngWriter:
    """Encodes pictures as PNG in the calling thread and writes the files in a background one,
    in order: creating hundreds of small files waits on the disk, not the processor, and so
    overlaps the drawing that follows. Leaving the ``with`` block waits for the last file and
    raises the first write error.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with PngWriter() as pngs:
        ...     path = pngs.write(np.zeros((2, 2, 3), np.uint8), folder / "a.png")
        >>> path.read_bytes()[1:4]
        b'PNG'
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Path, bytes] | None] = queue.SimpleQueue()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="png-writer", daemon=True)

    def __enter__(self) -> PngWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error

    def write(self, img: Tensor | np.ndarray, path: Path) -> Path:
        """Queue ``img`` (as :func:`write_png` takes it) for ``path``; returns ``path``."""
        if self._error is not None:
            raise self._error
        self._queue.put((path, _png(img)))
        return path

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    _write(*item)
                except OSError as err:
                    self._error = err
