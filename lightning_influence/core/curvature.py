"""Curvature-vector products of the mean training loss, over a block of vectors at once.

:class:`Curvature` is the one object every solver consumes: ``matvec(V)`` applies the curvature
of the mean training loss to each row of ``V`` (shape ``[m, p]``), ``minibatch`` gives the same
product on a random minibatch (for stochastic solvers), and ``dense()`` builds the whole matrix
for small models. Two curvatures are offered: the Hessian, and the Gauss-Newton matrix
``J^T H_out J`` (positive semi-definite even for non-convex models). Damping is added by the
solvers, never here. Under data parallelism ``reduce`` sums across processes, so every process
sees the same product; minibatches and subsamples are drawn by dataset index (windows of one
random order of the training set, :func:`~lightning_influence.core.data.random_ranks`), so they
hold the same examples whatever the number of processes. A failure while a process computes its
part of a product travels in the same sum, so the other processes raise too instead of waiting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from lightning_influence.core.data import IndexedData, random_ranks
from lightning_influence.core.gradients import rows_of
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.passes import VectorPasses
from lightning_influence.core.probe import ScoreProbe
from lightning_influence.core.products import (
    detach,
    example_jacobians,
    gauss_newton_by_jacobians,
    gauss_newton_products,
    gauss_newton_rows,
    hessian_products,
    output_hessians,
    outputs_and_pullback,
    products_from_factors,
)
from lightning_influence.validation import check_positive_int

__all__ = [
    "CollectiveFailure",
    "Curvature",
    "CurvatureChoice",
    "CurvatureKind",
    "Reduce",
    "gauss_newton_method",
]

CurvatureKind = Literal["gauss_newton", "hessian"]
# What a user may ask for: a kind, or "auto" (the Hessian where `H + damping I` is measured
# positive definite, else Gauss-Newton; decided before the solve, see `compute.py`).
CurvatureChoice = Literal["auto", "gauss_newton", "hessian"]
Reduce = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


class CollectiveFailure(RuntimeError):
    """Another process failed while computing its part of a curvature product this one summed."""


class Curvature:
    """Curvature of the mean training loss as products with blocks of vectors.

    Implements :class:`~lightning_influence.solvers.base.CurvatureOperator`, all that solvers see.

    Args:
        model: the model as a function of its flat parameters.
        data: the training data the curvature averages over.
        kind: ``"gauss_newton"`` or ``"hessian"``.
        reduce: sums a tensor across processes (identity on one process).
        output_directions: Gauss-Newton only. Keep, for each example, only the top
            ``output_directions`` eigenvectors of the loss Hessian with respect to the model
            outputs: one backward pass each, instead of one per output. For a trained softmax
            classifier the top one carries most of it. ``None`` (default) is exact.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence.core.data import as_indexed
        >>> from lightning_influence.core.model import FunctionalModel
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> data = as_indexed(TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,))))
        >>> curvature = Curvature(fm, data, kind="hessian")
        >>> curvature.matvec(torch.randn(2, 15)).shape
        torch.Size([2, 15])
    """

    def __init__(
        self,
        model: FunctionalModel,
        data: IndexedData,
        kind: CurvatureKind = "gauss_newton",
        reduce: Reduce | None = None,
        output_directions: int | None = None,
    ) -> None:
        if kind not in ("gauss_newton", "hessian"):
            raise ValueError(f"`curvature` must be 'gauss_newton' or 'hessian', got {kind!r}.")
        check_positive_int("output_directions", output_directions, allow_none=True)
        self.model = model
        self.data = data
        self.kind = kind
        self.reduce = reduce or _identity
        self.output_directions = output_directions
        # Running totals of the output Hessians' trace, kept and overall, over truncated products.
        self.trace_kept = 0.0
        self.trace_total = 0.0
        self._uniform_share: float | None = None
        # Forward multiply-adds per example and parameter (weight reuse), counted on first use.
        self.flops_per_parameter: float | None = None
        # Bytes a forward pass keeps for its backward, per example, measured on first use.
        self.activation_bytes: int | None = None
        # Vectors vmapped together through forward-mode passes, or one per pass: timed on first use.
        self.passes = VectorPasses()
        # Every local example's Jacobian and output Hessian, once worth keeping (see `factors`).
        self._factors: tuple[Tensor, Tensor] | None = None
        self._factors_decided = False
        self._factor_order: Tensor | None = None  # data position of each stored factor row
        local = torch.tensor(float(len(data)), dtype=torch.float64, device=model.device)
        self.n_total = int(self.reduce(local).item())
        if self.n_total == 0:
            raise ValueError("The training data is empty: there is no curvature to compute.")
        # Each local example's rank in one random order of the training set by dataset index:
        # minibatches and subsamples are windows of it, the same examples on any process count.
        size = len(data.dataset)  # type: ignore[arg-type]  # map-style, checked by as_indexed
        self._ranks, self._population = random_ranks(data.indices, size, 0, reduce, model.device)

    @property
    def n_params(self) -> int:
        """Dimension of the parameter space."""
        return self.model.n_params

    @property
    def dtype(self) -> torch.dtype:
        """Working precision of the products."""
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        """Device of the products."""
        return self.model.device

    @property
    def positive_semidefinite(self) -> bool:
        """True for the Gauss-Newton matrix; the Hessian may be indefinite."""
        return self.kind == "gauss_newton"

    @property
    def output_trace_kept(self) -> float | None:
        """Share of the output Hessians' trace that the kept ``output_directions`` carried over
        the products so far (``None`` when nothing was truncated)."""
        return self.trace_kept / self.trace_total if self.trace_total > 0 else None

    def batch_matvec(self, batch: Any, vectors: Tensor, exact: bool = False) -> Tensor:
        """Summed curvature of the examples in ``batch`` applied to each row of ``vectors``;
        ``exact`` ignores ``output_directions``. On a CPU the batch goes through the passes in
        parts of equal size whose activations stay within 64 MiB (see ``_PASS_BYTES``)."""
        fm = self.model
        prepared = fm.prepare(batch)
        inputs, targets, size = prepared.inputs, prepared.targets, prepared.size
        vectors = vectors.to(dtype=fm.dtype, device=fm.device)
        with torch.enable_grad():
            per_pass = self._examples_per_pass(inputs, size)
            if per_pass >= size:
                return self._products(inputs, targets, size, vectors, exact)
            parts = -(-size // per_pass)
            bounds = [i * size // parts for i in range(parts + 1)]
            total = torch.zeros_like(vectors)
            for start, end in pairwise(bounds):
                x, y = rows_of((inputs, targets), slice(start, end))
                total += self._products(x, y, end - start, vectors, exact)
            return total

    def _products(
        self, inputs: Any, targets: Any, size: int, vectors: Tensor, exact: bool
    ) -> Tensor:
        """:meth:`batch_matvec` of one pass's examples (``size`` of them)."""
        fm = self.model
        with torch.enable_grad():
            chunk = self._vectors_per_pass(inputs, size)
            if self.kind == "hessian":
                return hessian_products(fm, inputs, targets, vectors, chunk, self.passes)
            # one forward pass gives the outputs and the graph a forward-and-reverse product uses
            truncated = self.output_directions is not None and not exact
            out, pullback = outputs_and_pullback(fm, inputs, graph=not truncated)
            passes = self.passes
            if not isinstance(out, Tensor) or out.ndim == 0:
                return gauss_newton_products(
                    fm, inputs, targets, out, vectors, chunk, passes, pullback
                )
            directions = None if exact else self._truncated_directions(out)
            if directions is not None:
                del pullback
                rows, kept, total = gauss_newton_rows(fm, inputs, targets, out, directions)
                self.trace_kept += kept
                self.trace_total += total
                return sum(
                    ((block @ vectors.T).T @ block for block in rows), torch.zeros_like(vectors)
                )
            if self.flops_per_parameter is None:
                self.flops_per_parameter = _flops_per_parameter(fm, inputs)
            method = gauss_newton_method(out, vectors, self.flops_per_parameter)
            if method is gauss_newton_products:
                return gauss_newton_products(
                    fm, inputs, targets, out, vectors, chunk, passes, pullback
                )
            del pullback
            return method(fm, inputs, targets, out, vectors)

    def _examples_per_pass(self, inputs: Any, batch_size: int) -> int:
        """Examples per pass: on a CPU as many as hold ``_PASS_BYTES`` of activations (large
        tensors cost far more per example there: the ResNet-style CNN's products ran 1.6x faster
        in passes of 30 examples than of 256), elsewhere the whole batch."""
        if self.device.type != "cpu":
            return batch_size
        if self.activation_bytes is None:
            self.activation_bytes = _activation_bytes(self.model, inputs)
        return max(1, _PASS_BYTES // max(1, self.activation_bytes))

    def _vectors_per_pass(self, inputs: Any, batch_size: int) -> int:
        """Vectors per forward-mode pass over a batch: their tangents hold about ``vectors x
        batch`` activations, kept within 1 GiB (wide layers on large batches)."""
        if self.activation_bytes is None:
            self.activation_bytes = _activation_bytes(self.model, inputs)
        return max(1, _TANGENT_BYTES // max(1, batch_size * self.activation_bytes))

    @property
    def output_trace_uniform(self) -> float | None:
        """The share the kept directions would carry if every output direction weighed the same
        (``output_directions / outputs``), once products were truncated; ``None`` before."""
        return self._uniform_share

    def _truncated_directions(self, out: Tensor) -> int | None:
        """``output_directions`` where truncation applies (fewer directions than outputs, and the
        ``batch x outputs x outputs`` Hessians fit in 256 MiB), else ``None``: exact products."""
        directions = self.output_directions
        if directions is None:
            return None
        outputs = out[0].numel()
        fits = out.shape[0] * outputs**2 * out.element_size() <= _JACOBIAN_BYTES
        if directions < outputs and fits:
            self._uniform_share = directions / outputs
            return directions
        return None

    def matvec(self, vectors: Tensor, exact: bool = False) -> Tensor:
        """Mean curvature over all training data applied to each row of ``vectors`` ``[m, p]``."""

        def fill(acc: Tensor) -> None:
            factors = self.factors()
            if factors is not None:
                acc += products_from_factors(*factors, vectors.to(self.dtype))
                return
            for _, batch in self.data.batches():
                acc += self.batch_matvec(batch, vectors, exact).detach()

        return self._summed(vectors.shape, fill).div_(self.n_total)

    def _summed(self, shape: tuple[int, ...], fill: Callable[[Tensor], None]) -> Tensor:
        """What ``fill`` adds to a zero ``shape`` block, summed over processes, with a failure
        flag in the same sum: when ``fill`` raises on any process, every process raises (the one
        that failed its own error, the others :class:`CollectiveFailure`), none waits. The
        result is a new block, the caller's to change in place."""
        numel = math.prod(shape)
        # allocated before the work, so a process out of memory can still join the sum
        packed = torch.zeros(numel + 1, dtype=self.dtype, device=self.device)
        error: Exception | None = None
        try:
            fill(packed[:numel].view(shape))
        except Exception as err:
            if self.reduce is _identity:
                raise
            error = err
            packed[numel] = 1.0
        total = self.reduce(packed)
        failed = round(float(total[numel]))
        if error is not None:
            raise error
        if failed:
            raise CollectiveFailure(
                f"{failed} other process{'es' if failed > 1 else ''} failed while computing a "
                "curvature product (its error says why); this process stopped with it."
            )
        return total[:numel].view(shape)

    def _decided_factors(self) -> tuple[Tensor, Tensor] | None:
        """:meth:`factors`, computed (on first use) where a failure is agreed on: every process
        comes here at the same point, and a failure would otherwise leave the others waiting in
        their next sum."""
        if not self._factors_decided:

            def decide(_: Tensor) -> None:
                self.factors()

            self._summed((0,), decide)
        return self.factors()

    def _window(self, start: int, size: int) -> Tensor:
        """Data positions of the local examples ranked ``start`` to ``start + size`` (wrapping
        around the end of the order)."""
        return ((self._ranks - start) % self._population < size).nonzero().reshape(-1)

    def _stored(self, start: int, size: int) -> list[slice]:
        """The rows of the stored factors (sorted by rank) ranked ``start`` to ``start + size``,
        wrapping around: one or two slices."""
        assert self._factor_order is not None
        ranks = self._ranks[self._factor_order]
        end = start + size

        def row(rank: int) -> int:
            return int(torch.searchsorted(ranks, rank))

        if end <= self._population:
            return [slice(row(start), row(end))]
        return [slice(0, row(end - self._population)), slice(row(start), len(ranks))]

    def factors(self) -> tuple[Tensor, Tensor] | None:
        """Every local example's output Jacobian ``[n, k, p]`` and output-loss Hessian
        ``[n, k, k]``, computed once on first use, when the products are exact Gauss-Newton ones,
        per-example Jacobians beat forward-and-reverse products (``2 k < 5 r`` in the terms of
        :func:`gauss_newton_method`: convolutions, typically) and all of them fit in 256 MiB.
        Products then cost two matrix products, whatever the minibatch. ``None`` otherwise."""
        if self._factors_decided:
            return self._factors
        self._factors_decided = True
        if self.kind != "gauss_newton" or self.output_directions is not None:
            return None
        fm = self.model
        _, first = next(self.data.batches())
        prepared = fm.prepare(first)
        with torch.no_grad():
            out = fm.outputs(fm.theta, prepared.inputs)
        if not isinstance(out, Tensor) or out.ndim == 0:
            return None
        k, itemsize = out[0].numel(), out.element_size()
        if self.flops_per_parameter is None:
            self.flops_per_parameter = _flops_per_parameter(fm, prepared.inputs)
        cheaper = 2 * k < 5 * self.flops_per_parameter
        if not cheaper or len(self.data) * k * fm.n_params * itemsize > _JACOBIAN_BYTES:
            return None
        jacobians, hessians = [], []
        with torch.enable_grad():
            for _, batch in self.data.batches():
                prepared = fm.prepare(batch)
                out = detach(fm.outputs(fm.theta, prepared.inputs))
                jacobians.append(example_jacobians(fm, prepared.inputs).detach())
                hessians.append(output_hessians(fm, prepared.targets, out).detach())
        order = torch.argsort(self._ranks)  # by rank: a window of ranks is a range of rows
        self._factors = torch.cat(jacobians)[order], torch.cat(hessians)[order]
        self._factor_order = order
        return self._factors

    def minibatch(self, batch_size: int, generator: torch.Generator) -> Callable[[Tensor], Tensor]:
        """Products with the mean curvature of one random minibatch of the training data: the
        examples ranked ``start`` to ``start + batch_size`` (wrapping around) in the random order
        by dataset index, ``start`` drawn from ``generator``; the same examples on any number of
        processes, each computing those it holds. Every example is in as many windows as any
        other. Where factors are stored (sorted by rank), the window is a view of them."""
        size = min(batch_size, self._population)
        start = int(torch.randint(self._population, (1,), generator=generator))
        factors = self._decided_factors()
        if factors is not None:
            rows, (jacobians, hessians) = self._stored(start, size), factors

            def from_factors(vectors: Tensor) -> Tensor:
                def fill(acc: Tensor) -> None:
                    for r in rows:
                        v = vectors.to(self.dtype)
                        acc += products_from_factors(jacobians[r], hessians[r], v)

                return self._summed(vectors.shape, fill).div_(size)

            return from_factors
        pos = self._window(start, size)
        batches: list[Any] = []  # fetched by the first product, where a failure is agreed on

        def matvec(vectors: Tensor) -> Tensor:
            def fill(acc: Tensor) -> None:
                if pos.numel() == 0:
                    return
                if not batches:
                    batches.append(self.data.fetch(self.data.indices[pos]))
                acc += self.batch_matvec(batches[0], vectors).detach()

            return self._summed(vectors.shape, fill).div_(size)

        return matvec

    def subsample(
        self, max_examples: int | None, output_directions: int | None, generator: torch.Generator
    ) -> Curvature:
        """The same curvature on ``max_examples`` random examples of the training data (all of
        them when ``None`` or fewer), with ``output_directions`` for the Gauss-Newton matrix
        (ignored for the Hessian).

        The examples are a window of the random order by dataset index from a start drawn from
        ``generator``: the same on any number of processes, each keeping those it holds. Where
        per-example factors are stored (see :meth:`factors`), the subset shares them."""
        data = self.data
        directions = output_directions if self.kind == "gauss_newton" else None
        if max_examples is None or max_examples >= self._population:
            if directions == self.output_directions:
                return self
            return self._child(data, directions)
        start = int(torch.randint(self._population, (1,), generator=generator))
        factors = self._decided_factors() if directions is None else None
        if factors is not None and self._factor_order is not None:
            rows = self._stored(start, max_examples)
            stored = torch.cat([torch.arange(len(self._factor_order))[r] for r in rows])
            chosen, by_position = self._factor_order[stored].sort()
            child = self._child(data.subset(data.indices[chosen]), None)
            parts = [(factors[0][r], factors[1][r]) for r in rows if r.stop > r.start]
            if len(parts) == 1:  # a view
                child._factors = parts[0]
            else:
                child._factors = torch.cat([j for j, _ in parts]), torch.cat([h for _, h in parts])
            child._factors_decided = True
            child._factor_order = torch.empty_like(by_position)
            child._factor_order[by_position] = torch.arange(len(stored))
            return child
        data = data.subset(data.indices[self._window(start, max_examples)])
        return self._child(data, directions)

    def _child(self, data: IndexedData, directions: int | None) -> Curvature:
        """The same curvature on ``data``, sharing what was measured about the model's passes."""
        child = Curvature(self.model, data, self.kind, self.reduce, directions)
        child.passes = self.passes
        child.flops_per_parameter = self.flops_per_parameter
        child.activation_bytes = self.activation_bytes
        return child

    def probe(self, count: int, seed: int = 0) -> ScoreProbe:
        """The scores of ``count`` training examples drawn by dataset index with ``seed`` (the
        same on every process), for a solver to stop on the answer (:mod:`.probe`)."""
        return ScoreProbe(self.model, self.data, count, self.reduce, seed)

    def dense(self, chunk: int = 256) -> Tensor:
        """The whole ``[p, p]`` curvature matrix (exact products), from identity blocks, or
        ``sum_b J_b^T H_b J_b`` directly where per-example factors are stored."""
        p = self.n_params
        factors = self._decided_factors()
        if factors is not None:
            jacobians, hessians = factors

            def fill(mat: Tensor) -> None:
                for j, h in zip(jacobians.split(chunk), hessians.split(chunk), strict=True):
                    mat.addmm_(torch.bmm(h, j).reshape(-1, p).T, j.reshape(-1, p))

            mat = self._summed((p, p), fill) / self.n_total
            return (mat + mat.T) / 2
        eye = torch.eye(p, dtype=self.model.dtype, device=self.model.device)
        mat = torch.cat([self.matvec(eye[i : i + chunk], exact=True) for i in range(0, p, chunk)])
        return (mat + mat.T) / 2


# Per-example Jacobians of a batch hold ``batch x outputs x p`` numbers: never more than this.
_JACOBIAN_BYTES = 256 * 2**20
# Forward-mode tangents of one pass hold about ``vectors x batch`` activations: at most this.
_TANGENT_BYTES = 2**30
# On a CPU, one pass's examples hold at most this much activation (their own, not the tangents).
_PASS_BYTES = 64 * 2**20
GaussNewtonMethod = Callable[[FunctionalModel, Any, Any, Any, Tensor], Tensor]


def gauss_newton_method(
    out: Tensor, vectors: Tensor, flops_per_parameter: float = 1.0
) -> GaussNewtonMethod:
    """The cheaper way to compute ``J^T H_out J V`` for a batch, by a rule on shapes.

    In multiply-adds per example and parameter, with ``r = flops_per_parameter`` (the forward
    pass's reuse of each weight: about 1 for dense layers, the number of positions for a
    convolution), ``k`` outputs and ``m`` vectors: forward-and-reverse products cost about
    ``5 m r``; per-example Jacobians ``2 k r`` to build plus ``2 k m`` to apply. Jacobians are
    used only while the batch's ``batch x k x p`` of them fit in 256 MiB.

    Example:
        >>> import torch
        >>> gauss_newton_method(torch.zeros(8, 10), torch.zeros(20, 100)).__name__
        'gauss_newton_products'
        >>> gauss_newton_method(torch.zeros(8, 10), torch.zeros(20, 100), 30.0).__name__
        'gauss_newton_by_jacobians'
    """
    k, m, r = out[0].numel(), vectors.shape[0], flops_per_parameter
    jacobian_bytes = out.numel() * vectors.shape[1] * vectors.element_size()
    if 2 * k * r + 2 * k * m < 5 * m * r and jacobian_bytes <= _JACOBIAN_BYTES:
        return gauss_newton_by_jacobians
    return gauss_newton_products


def _flops_per_parameter(fm: FunctionalModel, inputs: Any) -> float:
    """Forward multiply-adds of one example per chosen parameter (1 for a dense layer)."""
    example = rows_of(inputs, slice(0, 1))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fm.outputs(fm.theta, example)
    return max(1.0, counter.get_total_flops() / 2 / fm.n_params)


def _activation_bytes(fm: FunctionalModel, inputs: Any) -> int:
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
