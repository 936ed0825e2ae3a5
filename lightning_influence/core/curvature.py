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
part of a product travels in the same sum (:mod:`.collective`), so the other processes raise too
instead of waiting. The kernels are in :mod:`.products`, how a batch is cut into passes in
:mod:`.passes`, and the per-example factors stored where they pay in :mod:`.factors`.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_influence.core.collective import Reduce, identity, summed
from lightning_influence.core.data import IndexedData, random_ranks
from lightning_influence.core.factors import ExampleFactors, example_factors
from lightning_influence.core.gradients import rows_of
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.passes import (
    JACOBIAN_BYTES,
    VectorPasses,
    examples_per_pass,
    measure_activation_bytes,
    measure_flops_per_parameter,
    vectors_per_pass,
)
from lightning_influence.core.probe import ScoreProbe
from lightning_influence.core.products import (
    gauss_newton_method,
    gauss_newton_products,
    gauss_newton_rows,
    hessian_products,
    outputs_and_pullback,
    products_from_factors,
)
from lightning_influence.validation import check_positive_int

__all__ = ["Curvature", "CurvatureChoice", "CurvatureKind"]

CurvatureKind = Literal["gauss_newton", "hessian"]
# What a user may ask for: a kind, or "auto" (the Hessian where `H + damping I` is measured
# positive definite, else Gauss-Newton; decided before the solve, see `compute.py`).
CurvatureChoice = Literal["auto", "gauss_newton", "hessian"]


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
        self.reduce = reduce or identity
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
        self._factors: ExampleFactors | None = None
        self._factors_decided = False
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
        parts of equal size whose activations stay within 64 MiB (``passes.PASS_BYTES``)."""
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
            method = gauss_newton_method(out, vectors, self._flops_per_parameter(inputs))
            if method is gauss_newton_products:
                return gauss_newton_products(
                    fm, inputs, targets, out, vectors, chunk, passes, pullback
                )
            del pullback
            return method(fm, inputs, targets, out, vectors)

    def _examples_per_pass(self, inputs: Any, batch_size: int) -> int:
        """Examples per pass: on a CPU :func:`~.passes.examples_per_pass`, elsewhere the batch."""
        if self.device.type != "cpu":
            return batch_size
        return examples_per_pass(self._activation_bytes(inputs))

    def _vectors_per_pass(self, inputs: Any, batch_size: int) -> int:
        """Vectors per forward-mode pass over a batch (:func:`~.passes.vectors_per_pass`)."""
        return vectors_per_pass(self._activation_bytes(inputs), batch_size)

    def _activation_bytes(self, inputs: Any) -> int:
        """Bytes a forward pass keeps per example, measured on first use."""
        if self.activation_bytes is None:
            self.activation_bytes = measure_activation_bytes(self.model, inputs)
        return self.activation_bytes

    def _flops_per_parameter(self, inputs: Any) -> float:
        """Forward multiply-adds per example and parameter, counted on first use."""
        if self.flops_per_parameter is None:
            self.flops_per_parameter = measure_flops_per_parameter(self.model, inputs)
        return self.flops_per_parameter

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
        fits = out.shape[0] * outputs**2 * out.element_size() <= JACOBIAN_BYTES
        if directions < outputs and fits:
            self._uniform_share = directions / outputs
            return directions
        return None

    def matvec(self, vectors: Tensor, exact: bool = False) -> Tensor:
        """Mean curvature over all training data applied to each row of ``vectors`` ``[m, p]``."""

        def fill(acc: Tensor) -> None:
            factors = self._example_factors()
            if factors is not None:
                v = vectors.to(self.dtype)
                acc += products_from_factors(factors.jacobians, factors.hessians, v)
                return
            for _, batch in self.data.batches():
                acc += self.batch_matvec(batch, vectors, exact).detach()

        return self._summed(vectors.shape, fill).div_(self.n_total)

    def _summed(self, shape: tuple[int, ...], fill: Callable[[Tensor], None]) -> Tensor:
        """What ``fill`` adds to a zero ``shape`` block, summed over processes with a failure
        flag (:func:`~.collective.summed`): a new block, the caller's to change in place."""
        return summed(shape, fill, self.reduce, self.dtype, self.device)

    def _decided_factors(self) -> ExampleFactors | None:
        """The stored factors, computed (on first use) where a failure is agreed on: every
        process comes here at the same point, and a failure would otherwise leave the others
        waiting in their next sum."""
        if not self._factors_decided:

            def decide(_: Tensor) -> None:
                self._example_factors()

            self._summed((0,), decide)
        return self._example_factors()

    def _window(self, start: int, size: int) -> Tensor:
        """Data positions of the local examples ranked ``start`` to ``start + size`` (wrapping
        around the end of the order)."""
        return ((self._ranks - start) % self._population < size).nonzero().reshape(-1)

    def factors(self) -> tuple[Tensor, Tensor] | None:
        """Every local example's output Jacobian ``[n, k, p]`` and output-loss Hessian
        ``[n, k, k]``, computed once on first use, when the products are exact Gauss-Newton ones
        and per-example Jacobians are worth storing (:func:`~.factors.example_factors`).
        Products then cost two matrix products, whatever the minibatch. ``None`` otherwise."""
        factors = self._example_factors()
        return None if factors is None else (factors.jacobians, factors.hessians)

    def _example_factors(self) -> ExampleFactors | None:
        """:meth:`factors`, sorted by rank, with the data position of each row."""
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
        flops = self._flops_per_parameter(prepared.inputs)
        self._factors = example_factors(fm, self.data, self._ranks, out, flops)
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
            rows = factors.rows(self._ranks, self._population, start, size)
            jacobians, hessians = factors.jacobians, factors.hessians

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
        if factors is not None:
            rows = factors.rows(self._ranks, self._population, start, max_examples)
            chosen, child_factors = factors.select(rows)
            child = self._child(data.subset(data.indices[chosen]), None)
            child._factors, child._factors_decided = child_factors, True
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
            mat = self._summed((p, p), lambda m: factors.add_dense(m, chunk)) / self.n_total
            return (mat + mat.T) / 2
        eye = torch.eye(p, dtype=self.model.dtype, device=self.model.device)
        mat = torch.cat([self.matvec(eye[i : i + chunk], exact=True) for i in range(0, p, chunk)])
        return (mat + mat.T) / 2
