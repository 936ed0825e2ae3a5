"""How a block of vectors goes through forward-mode passes: vmapped together or one per pass,
whichever :class:`VectorPasses` timed faster on the first block (:func:`by_chunks`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

__all__ = ["VectorPasses", "by_chunks"]


@dataclass
class VectorPasses:
    """Whether a block of vectors goes through the forward-mode passes vmapped together
    (``batched``) or one vector per pass, decided by timing both on the first block of three or
    more vectors (``None`` until then; ``batched_s`` and ``single_s`` keep the seconds per vector
    measured). ``vmap`` makes dense layers one larger matrix product per pass, which pays; it makes
    a convolution with batched weights (the tangent of its weight) a grouped convolution and its
    weight gradient a batched one, which on a CPU cost more than one pass per vector (the
    ResNet-style CNN of the benchmarks: 2.3 against 1.6 training steps per vector).

    Example:
        >>> passes = VectorPasses()
        >>> rows = by_chunks(lambda v: 2 * v, torch.ones(4, 3), None, passes)
        >>> rows.shape, passes.batched is not None
        (torch.Size([4, 3]), True)
    """

    batched: bool | None = None
    batched_s: float | None = None
    single_s: float | None = None


def by_chunks(
    product: Callable[[Tensor], Tensor],
    vectors: Tensor,
    chunk: int | None,
    passes: VectorPasses | None = None,
) -> Tensor:
    """``product`` of each row, vmapped over at most ``chunk`` rows at a time, in chunks of equal
    size (a last chunk of one row would cost nearly a whole pass); one row per pass where
    ``passes`` says that is faster, or decides it on this block by timing both."""
    m = vectors.shape[0]
    limit = m if chunk is None else max(1, min(chunk, m))
    if limit == 1 or (passes is not None and passes.batched is False):
        return torch.stack([product(v) for v in vectors])
    batched = vmap(product)
    if passes is None or passes.batched or m < 3:
        return _in_chunks(batched, vectors, limit)
    # Undecided: every row but the first vmapped, then the first alone, each timed per vector.
    start = _now(vectors)
    rest = _in_chunks(batched, vectors[1:], limit)
    middle = _now(vectors)
    first = product(vectors[0])
    passes.single_s = _now(vectors) - middle
    passes.batched_s = (middle - start) / (m - 1)
    passes.batched = passes.batched_s < passes.single_s
    return torch.cat([first[None], rest])


def _in_chunks(batched: Callable[[Tensor], Tensor], vectors: Tensor, limit: int) -> Tensor:
    m = vectors.shape[0]
    if limit >= m:
        return batched(vectors)
    passes = -(-m // limit)
    return torch.cat([batched(rows) for rows in vectors.split(-(-m // passes))])


def _now(like: Tensor) -> float:
    """Wall-clock seconds, once the device has finished the work queued so far."""
    if like.device.type == "cuda":
        torch.cuda.synchronize(like.device)
    return time.perf_counter()
