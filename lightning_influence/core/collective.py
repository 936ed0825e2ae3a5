"""Sums across processes that carry a failure flag, so no process is left waiting.

Under data parallelism each process computes its part of a product and ``reduce`` sums the
parts. A process that raised while computing its part would never join that sum, and the others
would wait for it for ever: :func:`summed` puts a failure flag in the same sum, so every process
raises instead (the one that failed its own error, the others :class:`CollectiveFailure`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["CollectiveFailure", "Reduce", "identity", "summed"]

Reduce = Callable[[Tensor], Tensor]


def identity(t: Tensor) -> Tensor:
    """The sum over one process: ``t`` itself."""
    return t


class CollectiveFailure(RuntimeError):
    """Another process failed while computing its part of a curvature product this one summed."""


def summed(
    shape: tuple[int, ...],
    fill: Callable[[Tensor], None],
    reduce: Reduce,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """What ``fill`` adds to a zero ``shape`` block, summed over processes by ``reduce``, with a
    failure flag in the same sum: when ``fill`` raises on any process, every process raises (the
    one that failed its own error, the others :class:`CollectiveFailure`), none waits. The
    result is a new block, the caller's to change in place.

    Example:
        >>> def fill(block: Tensor) -> None:
        ...     block += 1.0
        >>> summed((2,), fill, lambda t: 2 * t, torch.float32, torch.device("cpu"))  # 2 processes
        tensor([2., 2.])
    """
    numel = math.prod(shape)
    # allocated before the work, so a process out of memory can still join the sum
    packed = torch.zeros(numel + 1, dtype=dtype, device=device)
    error: Exception | None = None
    try:
        fill(packed[:numel].view(shape))
    except Exception as err:
        if reduce is identity:
            raise
        error = err
        packed[numel] = 1.0
    total = reduce(packed)
    failed = round(float(total[numel]))
    if error is not None:
        raise error
    if failed:
        raise CollectiveFailure(
            f"{failed} other process{'es' if failed > 1 else ''} failed while computing a "
            "curvature product (its error says why); this process stopped with it."
        )
    return total[:numel].view(shape)
