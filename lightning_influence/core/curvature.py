"""Curvature-vector products of the mean training loss, over a block of vectors at once.

:class:`Curvature` is the one object every solver consumes: ``matvec(V)`` applies the curvature
of the mean training loss to each row of ``V`` (shape ``[m, p]``), ``sample_matvec`` does the same
on a random minibatch (for stochastic solvers), and ``dense()`` builds the whole matrix for small
models. Two curvatures are offered: the Hessian, and the Gauss-Newton matrix ``J^T H_out J``
(positive semi-definite even for non-convex models). Damping is added by the solvers, never here.
Under data parallelism ``reduce`` sums across processes, so every process sees the same product.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode

from lightning_influence.core.data import IndexedData
from lightning_influence.core.gradients import one_example
from lightning_influence.core.model import FunctionalModel
from lightning_influence.solvers.base import check_positive_int

__all__ = ["Curvature", "CurvatureKind", "Reduce", "gauss_newton_method"]

CurvatureKind = Literal["gauss_newton", "hessian"]
Reduce = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


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
        # Forward multiply-adds per example and parameter (weight reuse), counted on first use.
        self.flops_per_parameter: float | None = None
        # Every local example's Jacobian and output Hessian, once worth keeping (see `factors`).
        self._factors: tuple[Tensor, Tensor] | None = None
        self._factors_decided = False
        local = torch.tensor(float(len(data)), dtype=torch.float64, device=model.device)
        self.n_total = int(self.reduce(local).item())
        if self.n_total == 0:
            raise ValueError("The training data is empty: there is no curvature to compute.")

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
        ``exact`` ignores ``output_directions``."""
        fm = self.model
        prepared = fm.prepare(batch)
        inputs, targets = prepared.inputs, prepared.targets
        vectors = vectors.to(dtype=fm.dtype, device=fm.device)
        with torch.enable_grad():
            if self.kind == "hessian":
                return _hessian_products(fm, inputs, targets, vectors)
            out = _detach(fm.outputs(fm.theta, inputs))
            if not isinstance(out, Tensor) or out.ndim == 0:
                return _gauss_newton_products(fm, inputs, targets, out, vectors)
            directions = None if exact else self._truncated_directions(out)
            if directions is not None:
                rows, kept, total = _gauss_newton_rows(fm, inputs, targets, out, directions)
                self.trace_kept += kept
                self.trace_total += total
                return sum(
                    ((block @ vectors.T).T @ block for block in rows), torch.zeros_like(vectors)
                )
            if self.flops_per_parameter is None:
                self.flops_per_parameter = _flops_per_parameter(fm, inputs)
            method = gauss_newton_method(out, vectors, self.flops_per_parameter)
            return method(fm, inputs, targets, out, vectors)

    def _truncated_directions(self, out: Tensor) -> int | None:
        """``output_directions`` where truncation applies (fewer directions than outputs, and the
        ``batch x outputs x outputs`` Hessians fit in 256 MiB), else ``None``: exact products."""
        directions = self.output_directions
        if directions is None:
            return None
        outputs = out[0].numel()
        fits = out.shape[0] * outputs**2 * out.element_size() <= _JACOBIAN_BYTES
        return directions if directions < outputs and fits else None

    def matvec(self, vectors: Tensor, exact: bool = False) -> Tensor:
        """Mean curvature over all training data applied to each row of ``vectors`` ``[m, p]``."""
        factors = self.factors()
        if factors is not None:
            acc = _products_from_factors(*factors, vectors.to(self.dtype))
        else:
            acc = torch.zeros_like(vectors, dtype=self.model.dtype, device=self.model.device)
            for _, batch in self.data.batches():
                acc += self.batch_matvec(batch, vectors, exact).detach()
        return self.reduce(acc) / self.n_total

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
        jacobian = torch.func.jacrev(partial(_flat_output, fm))
        jacobians, hessians = [], []
        with torch.enable_grad():
            for _, batch in self.data.batches():
                prepared = fm.prepare(batch)
                out = _detach(fm.outputs(fm.theta, prepared.inputs))
                jacobians.append(_per_example(jacobian, fm.theta, prepared.inputs).detach())
                hessians.append(_output_hessians(fm, prepared.targets, out).detach())
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(0))
        self._factors = torch.cat(jacobians)[order], torch.cat(hessians)[order]
        return self._factors

    def minibatch(self, batch_size: int, generator: torch.Generator) -> Callable[[Tensor], Tensor]:
        """Products with the mean curvature of one random minibatch of this process's data,
        drawn without replacement (pooled over processes)."""
        n_local = len(self.data)
        pos = torch.randperm(n_local, generator=generator)[: min(batch_size, n_local)]
        count = self.reduce(torch.tensor(float(len(pos)), device=self.device, dtype=self.dtype))
        factors = self.factors()
        if factors is not None:
            # Stored in a random order, so a contiguous window (a view, no copy) is a random
            # minibatch; the solvers' full-data residuals keep any unevenness out of the result.
            start = int(torch.randint(n_local - len(pos) + 1, (1,), generator=generator))
            window = slice(start, start + len(pos))
            jacobians, hessians = factors[0][window], factors[1][window]

            def from_factors(vectors: Tensor) -> Tensor:
                products = _products_from_factors(jacobians, hessians, vectors.to(self.dtype))
                return self.reduce(products) / count

            return from_factors
        batch = self.data.fetch(self.data.indices[pos])

        def matvec(vectors: Tensor) -> Tensor:
            return self.reduce(self.batch_matvec(batch, vectors).detach()) / count

        return matvec

    def subsample(
        self, max_examples: int | None, output_directions: int | None, generator: torch.Generator
    ) -> Curvature:
        """The same curvature on at most ``max_examples`` random examples of this process's data,
        with ``output_directions`` for the Gauss-Newton matrix (ignored for the Hessian)."""
        data = self.data
        if max_examples is not None and max_examples < len(data):
            pos = torch.randperm(len(data), generator=generator)[:max_examples]
            data = data.subset(data.indices[pos.sort().values])
        directions = output_directions if self.kind == "gauss_newton" else None
        if data is self.data and directions == self.output_directions:
            return self
        return Curvature(self.model, data, self.kind, self.reduce, directions)

    def dense(self, chunk: int = 256) -> Tensor:
        """The whole ``[p, p]`` curvature matrix (exact products), from identity blocks."""
        p = self.n_params
        eye = torch.eye(p, dtype=self.model.dtype, device=self.model.device)
        mat = torch.cat([self.matvec(eye[i : i + chunk], exact=True) for i in range(0, p, chunk)])
        return (mat + mat.T) / 2


# Per-example Jacobians of a batch hold ``batch x outputs x p`` numbers: never more than this.
_JACOBIAN_BYTES = 256 * 2**20
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
        '_gauss_newton_products'
        >>> gauss_newton_method(torch.zeros(8, 10), torch.zeros(20, 100), 30.0).__name__
        '_gauss_newton_by_jacobians'
    """
    k, m, r = out[0].numel(), vectors.shape[0], flops_per_parameter
    jacobian_bytes = out.numel() * vectors.shape[1] * vectors.element_size()
    if 2 * k * r + 2 * k * m < 5 * m * r and jacobian_bytes <= _JACOBIAN_BYTES:
        return _gauss_newton_by_jacobians
    return _gauss_newton_products


def _flops_per_parameter(fm: FunctionalModel, inputs: Any) -> float:
    """Forward multiply-adds of one example per chosen parameter (1 for a dense layer)."""
    example = tree_map(lambda t: t[:1] if isinstance(t, Tensor) and t.ndim else t, inputs)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fm.outputs(fm.theta, example)
    return max(1.0, counter.get_total_flops() / 2 / fm.n_params)


def _hessian_products(fm: FunctionalModel, inputs: Any, targets: Any, vectors: Tensor) -> Tensor:
    def total(th: Tensor) -> Tensor:
        return fm.losses(th, inputs, targets).sum()

    def hv(v: Tensor) -> Tensor:
        return jvp(grad(total), (fm.theta,), (v,))[1]

    return vmap(hv)(vectors)


def _gauss_newton_products(
    fm: FunctionalModel, inputs: Any, targets: Any, out: Any, vectors: Tensor
) -> Tensor:
    """``J^T H_out J v``: forward mode for ``J v``, reverse mode for ``J^T``, vmapped over ``v``."""

    def outputs(th: Tensor) -> Any:
        return fm.outputs(th, inputs)

    _, pullback = vjp(outputs, fm.theta)  # type: ignore[misc]

    def loss_of_outputs(o: Any) -> Tensor:
        return fm.losses_from_outputs(o, targets).sum()

    def gnv(v: Tensor) -> Tensor:
        jv = jvp(outputs, (fm.theta,), (v,))[1]
        hjv = jvp(grad(loss_of_outputs), (out,), (jv,))[1]
        return pullback(hjv)[0]

    return vmap(gnv)(vectors)


def _gauss_newton_by_jacobians(
    fm: FunctionalModel, inputs: Any, targets: Any, out: Tensor, vectors: Tensor
) -> Tensor:
    """``sum_b J_b^T H_b J_b v`` with per-example Jacobians ``J_b`` ``[k, p]`` and loss Hessians
    ``H_b`` ``[k, k]`` (``k`` outputs per example)."""

    jacobian = torch.func.jacrev(partial(_flat_output, fm))
    jac = _per_example(jacobian, fm.theta, inputs)  # [B, k, p]
    h_out = _output_hessians(fm, targets, out)
    jv = torch.einsum("bkp,mp->bkm", jac, vectors)
    hjv = torch.einsum("bkl,blm->bkm", h_out, jv)
    return torch.einsum("bkp,bkm->mp", jac, hjv)


def _products_from_factors(jacobians: Tensor, hessians: Tensor, vectors: Tensor) -> Tensor:
    """``sum_b J_b^T H_b J_b v`` for each row ``v`` of ``vectors``, from stored factors."""
    n, k, p = jacobians.shape
    jv = torch.matmul(jacobians, vectors.T)  # [n, k, m]
    hjv = torch.bmm(hessians, jv).reshape(n * k, -1)
    return (jacobians.reshape(n * k, p).T @ hjv).T


def _flat_output(fm: FunctionalModel, theta: Tensor, example: Any) -> Tensor:
    """The outputs of one unbatched example, flattened to ``[k]``."""
    return fm.outputs(theta, one_example(example)).reshape(-1)


def _output_hessians(fm: FunctionalModel, targets: Any, out: Tensor) -> Tensor:
    """Each example's loss Hessian w.r.t. its own outputs, ``[B, k, k]``.

    Per-sample losses make the batch's Hessian block-diagonal, so ``k`` reverse passes of the
    summed loss's output gradient (one per output coordinate, all examples at once) give every
    block: much faster than one vmapped Hessian per example.
    """
    batch, k = out.shape[0], out[0].numel()

    def output_gradient(o: Tensor) -> Tensor:
        return grad(lambda o: fm.losses_from_outputs(o.reshape(out.shape), targets).sum())(o)

    _, pullback = vjp(output_gradient, out.reshape(batch, k))  # type: ignore[misc]
    units = torch.eye(k, dtype=out.dtype, device=out.device)[:, None, :].expand(k, batch, k)
    rows = vmap(lambda u: pullback(u)[0])(units)  # [k, B, k]: row i of every example's block
    return rows.transpose(0, 1)


def _gauss_newton_rows(
    fm: FunctionalModel, inputs: Any, targets: Any, out: Tensor, directions: int
) -> tuple[list[Tensor], float, float]:
    """Rows ``r_bs = sqrt(l_bs) J_b^T u_bs`` from the top eigenpairs ``(l_bs, u_bs)`` of each
    example's output Hessian, one ``[B, p]`` block per direction ``s``, so that
    ``sum_s r_bs r_bs^T`` is ``J_b^T H_b J_b`` restricted to those directions: one per-example
    backward pass per direction. Also returns the kept and the total trace of the output
    Hessians."""
    top, kept, total = _top_directions(_output_hessians(fm, targets, out), directions)

    def along(th: Tensor, x: Any, cotangent: Tensor) -> Tensor:
        return (_flat_output(fm, th, x) * cotangent).sum()

    row = grad(along)  # one per-example backward pass per direction
    rows = [_per_example(row, fm.theta, inputs, top[:, :, j]) for j in range(top.shape[2])]
    return rows, kept, total


def _per_example(fn: Callable[..., Tensor], theta: Tensor, *batched: Any) -> Tensor:
    """``fn(theta, *example)`` for each example of the batches, stacked: vmapped, or a loop over
    examples for a model that ``vmap`` cannot trace (a forward that calls ``.item()``, say)."""
    try:
        return vmap(fn, in_dims=(None, *([0] * len(batched))))(theta, *batched)
    except (RuntimeError, ValueError, NotImplementedError):
        leaves = [t for t in tree_leaves(batched) if isinstance(t, Tensor)]
        return torch.stack([fn(theta, *_example(batched, i)) for i in range(leaves[0].shape[0])])


def _example(tree: Any, i: int) -> Any:
    """Example ``i`` of every tensor in ``tree``, without its batch dimension."""
    return tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, tree)


def _top_directions(h_out: Tensor, directions: int) -> tuple[Tensor, float, float]:
    """Cotangents ``C_b = U_b sqrt(L_b)`` ``[B, k, directions]`` from the top eigenpairs of each
    positive semi-definite ``h_out[b]``, and the kept and the total trace."""
    evals, evecs = torch.linalg.eigh((h_out + h_out.transpose(1, 2)) / 2)  # ascending
    evals = evals.clamp_min(0)
    top = evals[:, -directions:]
    return evecs[:, :, -directions:] * top[:, None, :].sqrt(), float(top.sum()), float(evals.sum())


def _detach(tree: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)
