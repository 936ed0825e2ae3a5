"""How a batch and a block of vectors go through the passes of a curvature product.

Sizes from memory budgets: examples per pass on a CPU (:func:`examples_per_pass`), vectors per
forward-mode pass (:func:`vectors_per_pass`), from what a forward pass keeps per example
(:func:`measure_activation_bytes`); and, by timing, whether a block's vectors go through the
passes vmapped together or one per pass (:class:`VectorPasses`, :func:`by_chunks`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils.flop_counter import FlopCounterMode

from lightning_influence.core.gradients import rows_of
from lightning_influence.core.model import FunctionalModel

__all__ = [
    "JACOBIAN_BYTES",
    "PASS_BYTES",
    "TANGENT_BYTES",
    "VectorPasses",
    "by_chunks",
    "examples_per_pass",
    "measure_activation_bytes",
    "measure_flops_per_parameter",
    "vectors_per_pass",
]


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


# Per-example Jacobians of a batch hold ``batch x outputs x p`` numbers: never more than this.
JACOBIAN_BYTES = 256 * 2**20
# Forward-mode tangents of one pass hold about ``vectors x batch`` activations: at most this.
TANGENT_BYTES = 2**30
# On a CPU, one pass's examples hold at most this much activation (their own, not the tangents).
PASS_BYTES = 64 * 2**20


def examples_per_pass(activation_bytes: int) -> int:
    """Examples per pass on a CPU: as many as hold ``PASS_BYTES`` of activations (large tensors
    cost far more per example there: the ResNet-style CNN's products ran 1.6x faster in passes
    of 30 examples than of 256), given the bytes one example keeps for its backward.

    Example:
        >>> examples_per_pass(2**20)
        64
    """
    return max(1, PASS_BYTES // max(1, activation_bytes))


def vectors_per_pass(activation_bytes: int, batch_size: int) -> int:
    """Vectors per forward-mode pass over a batch: their tangents hold about ``vectors x batch``
    activations, kept within ``TANGENT_BYTES`` (wide layers on large batches).

    Example:
        >>> vectors_per_pass(2**20, batch_size=256)
        4
    """
    return max(1, TANGENT_BYTES // max(1, batch_size * activation_bytes))


def measure_flops_per_parameter(fm: FunctionalModel, inputs: Any) -> float:
    """Forward multiply-adds of one example per chosen parameter (1 for a dense layer)."""
    example = rows_of(inputs, slice(0, 1))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fm.outputs(fm.theta, example)
    return max(1.0, counter.get_total_flops() / 2 / fm.n_params)


def measure_activation_bytes(fm: FunctionalModel, inputs: Any) -> int:
    """Bytes the forward pass saves for its backward, per example: two examples' minus one's
    (what does not grow with the batch, such as the weights, cancels)."""

    def saved(n: int) -> int:
        total = 0

        def count(t: Tensor) -> Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        head = rows_of(inputs, slice(0, n))
        theta = fm.theta.detach().requires_grad_()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            fm.outputs(theta, head)
        return total

    return max(0, saved(2) - saved(1))
