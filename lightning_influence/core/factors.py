"""Every local example's output Jacobian and output-loss Hessian, stored once for Gauss-Newton
products.

Where per-example Jacobians beat forward-and-reverse products (convolutions, typically) and all
of them fit in 256 MiB, :class:`~lightning_influence.core.curvature.Curvature` stores them
(:func:`example_factors`): every product is then two matrix products, ``sum_b J_b^T H_b J_b v``,
whatever the minibatch. The rows are sorted by each example's rank in the random order by
dataset index (:func:`~lightning_influence.core.data.random_ranks`), so a window of ranks (a
minibatch, a subsample) is one or two ranges of rows (:meth:`ExampleFactors.rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_influence.core.data import IndexedData
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.passes import JACOBIAN_BYTES
from lightning_influence.core.products import detach, example_jacobians, output_hessians

__all__ = ["ExampleFactors", "example_factors"]


@dataclass
class ExampleFactors:
    """Output Jacobians ``[n, k, p]`` and output-loss Hessians ``[n, k, k]`` of ``n`` examples,
    one row each, sorted by rank; ``order`` is the data position of each row.

    Example:
        >>> ranks = torch.tensor([1, 2, 0])  # the rank of the examples at data positions 0, 1, 2
        >>> order = torch.argsort(ranks)
        >>> factors = ExampleFactors(torch.ones(3, 1, 2), torch.ones(3, 1, 1), order)
        >>> factors.rows(ranks, population=3, start=2, size=2)  # ranks 2 and 0, wrapping around
        [slice(0, 1, None), slice(2, 3, None)]
        >>> factors.select([slice(0, 1), slice(2, 3)])[0]  # their data positions
        tensor([1, 2])
    """

    jacobians: Tensor
    hessians: Tensor
    order: Tensor

    def rows(self, ranks: Tensor, population: int, start: int, size: int) -> list[slice]:
        """The rows ranked ``start`` to ``start + size``, wrapping around the end of the order
        (``population`` ranks; ``ranks`` is every local example's rank by data position): one or
        two slices."""
        in_order = ranks[self.order]
        end = start + size

        def row(rank: int) -> int:
            return int(torch.searchsorted(in_order, rank))

        if end <= population:
            return [slice(row(start), row(end))]
        return [slice(0, row(end - population)), slice(row(start), len(in_order))]

    def select(self, rows: list[slice]) -> tuple[Tensor, ExampleFactors]:
        """The data positions of the examples in ``rows`` (ascending), and their factors (a view
        where ``rows`` is one range) with each row's position among those examples."""
        stored = torch.cat([torch.arange(len(self.order))[r] for r in rows])
        chosen, by_position = self.order[stored].sort()
        parts = [(self.jacobians[r], self.hessians[r]) for r in rows if r.stop > r.start]
        if len(parts) == 1:  # a view
            jacobians, hessians = parts[0]
        else:
            jacobians, hessians = torch.cat([j for j, _ in parts]), torch.cat([h for _, h in parts])
        order = torch.empty_like(by_position)
        order[by_position] = torch.arange(len(stored))
        return chosen, ExampleFactors(jacobians, hessians, order)

    def add_dense(self, mat: Tensor, chunk: int) -> None:
        """Add ``sum_b J_b^T H_b J_b`` to ``mat`` ``[p, p]``, ``chunk`` examples at a time."""
        p = mat.shape[0]
        for j, h in zip(self.jacobians.split(chunk), self.hessians.split(chunk), strict=True):
            mat.addmm_(torch.bmm(h, j).reshape(-1, p).T, j.reshape(-1, p))


def example_factors(
    fm: FunctionalModel, data: IndexedData, ranks: Tensor, out: Tensor, flops_per_parameter: float
) -> ExampleFactors | None:
    """Every example of ``data``'s factors, sorted by ``ranks``, where per-example Jacobians beat
    forward-and-reverse products (``2 k < 5 r`` in the terms of
    :func:`~lightning_influence.core.products.gauss_newton_method`, ``k`` outputs per example in
    ``out``, the first batch's outputs, and ``r = flops_per_parameter``) and all of them fit in
    256 MiB; ``None`` otherwise."""
    k, itemsize = out[0].numel(), out.element_size()
    cheaper = 2 * k < 5 * flops_per_parameter
    if not cheaper or len(data) * k * fm.n_params * itemsize > JACOBIAN_BYTES:
        return None
    jacobians, hessians = [], []
    with torch.enable_grad():
        for _, batch in data.batches():
            prepared = fm.prepare(batch)
            out = detach(fm.outputs(fm.theta, prepared.inputs))
            jacobians.append(example_jacobians(fm, prepared.inputs).detach())
            hessians.append(output_hessians(fm, prepared.targets, out).detach())
    order = torch.argsort(ranks)  # by rank: a window of ranks is a range of rows
    return ExampleFactors(torch.cat(jacobians)[order], torch.cat(hessians)[order], order)
