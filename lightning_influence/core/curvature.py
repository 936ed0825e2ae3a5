"""Curvature-vector products of the mean training loss, over a block of vectors at once.

:class:`Curvature` is the one object every solver consumes: ``matvec(V)`` applies the curvature
of the mean training loss to each row of ``V`` (shape ``[m, p]``), ``sample_matvec`` does the same
on a random minibatch (for stochastic solvers), and ``dense()`` builds the whole matrix for small
models. Two curvatures are offered: the Hessian, and the Gauss-Newton matrix ``J^T H_out J``
(positive semi-definite even for non-convex models). Damping is added by the solvers, never here.
Under data parallelism ``reduce`` sums across processes, so every process sees the same product.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap
from torch.utils._pytree import tree_map

from lightning_influence.core.data import IndexedData
from lightning_influence.core.gradients import one_example
from lightning_influence.core.model import FunctionalModel

__all__ = ["Curvature", "CurvatureKind"]

CurvatureKind = Literal["gauss_newton", "hessian"]
Reduce = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


class Curvature:
    """Curvature of the mean training loss as products with blocks of vectors.

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
        if output_directions is not None and (
            not isinstance(output_directions, int) or output_directions < 1
        ):
            raise ValueError(
                "`output_directions` must be a positive integer or None (exact Gauss-Newton), "
                f"got {output_directions!r}."
            )
        self.model = model
        self.data = data
        self.kind = kind
        self.reduce = reduce or _identity
        self.output_directions = output_directions
        self._output_trace = [0.0, 0.0]  # kept and total output-Hessian trace, when truncating
        local = torch.tensor(float(len(data)), dtype=torch.float64, device=model.device)
        self.n_total = int(self.reduce(local).item())
        if self.n_total == 0:
            raise ValueError("The training data is empty: there is no curvature to compute.")
        self._gauss_newton_method: dict[int, str] = {}
        self._fixed_method: str | None = None

    @property
    def n_params(self) -> int:
        """Dimension of the parameter space."""
        return self.model.n_params

    def batch_matvec(self, batch: Any, vectors: Tensor) -> Tensor:
        """Summed curvature of the examples in ``batch`` applied to each row of ``vectors``."""
        fm = self.model
        inputs, targets = fm.task.unpack(batch)
        inputs, targets = fm.cast(inputs), fm.cast(targets)
        vectors = vectors.to(dtype=fm.dtype, device=fm.device)
        with torch.enable_grad():
            if self.kind == "hessian":
                return _hessian_products(fm, inputs, targets, vectors)
            out = _detach(fm.outputs(fm.theta, inputs))
            if not isinstance(out, Tensor) or out.ndim == 0:
                return _gauss_newton_products(fm, inputs, targets, out, vectors)
            directions = self._truncated_directions(out)
            if directions is not None:
                rows, kept, total = _gauss_newton_rows(fm, inputs, targets, out, directions)
                self._output_trace[0] += kept
                self._output_trace[1] += total
                return sum(
                    ((block @ vectors.T).T @ block for block in rows), torch.zeros_like(vectors)
                )
            return self._fastest_gauss_newton(fm, inputs, targets, out, vectors)

    @property
    def output_trace_kept(self) -> float | None:
        """Share of the output Hessians' trace that the kept ``output_directions`` carried over
        the products so far (``None`` when nothing was truncated)."""
        kept, total = self._output_trace
        return kept / total if total > 0 else None

    def _truncated_directions(self, out: Tensor) -> int | None:
        """``output_directions`` where truncation applies (fewer directions than outputs, and the
        ``batch x outputs x outputs`` Hessians fit in 256 MiB), else ``None``: exact products."""
        directions = self.output_directions
        if directions is None or self._fixed_method is not None:
            return None
        outputs = out[0].numel()
        fits = out.shape[0] * outputs**2 * out.element_size() <= _JACOBIAN_BYTES
        return directions if directions < outputs and fits else None

    def _fastest_gauss_newton(
        self, fm: FunctionalModel, inputs: Any, targets: Any, out: Tensor, vectors: Tensor
    ) -> Tensor:
        """Gauss-Newton products by whichever method is faster for this block size.

        Forward-and-reverse products cost two passes per vector; per-example Jacobians cost one
        reverse pass per model output, whatever the number of vectors. Which wins depends on the
        layers (convolutions are slow under vmapped forward mode), so both are timed, twice each, on
        the first examples of the first batch. Jacobians are used only while the batch's
        ``batch x outputs x p`` numbers fit in 256 MiB.
        """
        methods = {"products": _gauss_newton_products, "jacobians": _gauss_newton_by_jacobians}
        jacobian_bytes = out.numel() * vectors.shape[1] * vectors.element_size()
        if jacobian_bytes > _JACOBIAN_BYTES and self._fixed_method is None:
            return _gauss_newton_products(fm, inputs, targets, out, vectors)  # memory-bound
        chosen = self._fixed_method or self._gauss_newton_method.get(vectors.shape[0])
        if chosen is None:
            few_inputs, few_targets, few_out = (
                _head(t, _PROBE_EXAMPLES) for t in (inputs, targets, out)
            )
            timings = dict.fromkeys(methods, math.inf)
            for _ in range(2):  # the first call of each also pays one-off set-up costs
                for name, method in methods.items():
                    _synchronize(fm.device)
                    start = time.perf_counter()
                    method(fm, few_inputs, few_targets, few_out, vectors)
                    _synchronize(fm.device)
                    timings[name] = min(timings[name], time.perf_counter() - start)
            chosen = min(timings, key=timings.__getitem__)
            self._gauss_newton_method[vectors.shape[0]] = chosen
        return methods[chosen](fm, inputs, targets, out, vectors)

    def matvec(self, vectors: Tensor) -> Tensor:
        """Mean curvature over all training data applied to each row of ``vectors`` ``[m, p]``."""
        acc = torch.zeros_like(vectors, dtype=self.model.dtype, device=self.model.device)
        for _, batch in self.data.batches():
            acc += self.batch_matvec(batch, vectors).detach()
        return self.reduce(acc) / self.n_total

    def sample(self, batch_size: int, generator: torch.Generator) -> Any:
        """A random minibatch of this process's training data, drawn without replacement."""
        n_local = len(self.data)
        pos = torch.randperm(n_local, generator=generator)[: min(batch_size, n_local)]
        return self.data.fetch(self.data.indices[pos])

    def minibatch_matvec(self, batch: Any, vectors: Tensor) -> Tensor:
        """Mean curvature of ``batch`` (pooled over processes) times the rows of ``vectors``."""
        out = self.batch_matvec(batch, vectors).detach()
        size = self.model.task.batch_size(self.model.task.unpack(batch)[0])
        count = torch.tensor(float(size), dtype=out.dtype, device=out.device)
        return self.reduce(out) / self.reduce(count)

    def dense(self, chunk: int = 256) -> Tensor:
        """The whole ``[p, p]`` curvature matrix, built from products with identity blocks.

        Gauss-Newton blocks always use per-example Jacobians here, so the matrix is the same
        from run to run (no timing-dependent choice).
        """
        p = self.n_params
        eye = torch.eye(p, dtype=self.model.dtype, device=self.model.device)
        self._fixed_method = "jacobians"
        try:
            cols = [self.matvec(eye[i : i + chunk]) for i in range(0, p, chunk)]
        finally:
            self._fixed_method = None
        mat = torch.cat(cols)
        return (mat + mat.T) / 2


_PROBE_EXAMPLES = 128
# Per-example Jacobians of a batch hold ``batch x outputs x p`` numbers: never more than this.
_JACOBIAN_BYTES = 256 * 2**20


def _head(tree: Any, n: int) -> Any:
    """The first ``n`` examples of a batch (a tensor or a nest of them)."""
    return tree_map(lambda t: t[:n] if isinstance(t, Tensor) and t.ndim > 0 else t, tree)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    jac = vmap(jacobian, in_dims=(None, 0))(fm.theta, inputs)  # [B, k, p]
    h_out = _output_hessians(fm, targets, out)
    jv = torch.einsum("bkp,mp->bkm", jac, vectors)
    hjv = torch.einsum("bkl,blm->bkm", h_out, jv)
    return torch.einsum("bkp,bkm->mp", jac, hjv)


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

    row = vmap(grad(along), in_dims=(None, 0, 0))  # one per-example backward pass per direction
    rows = [row(fm.theta, inputs, top[:, :, j]) for j in range(top.shape[2])]
    return rows, kept, total


def _top_directions(h_out: Tensor, directions: int) -> tuple[Tensor, float, float]:
    """Cotangents ``C_b = U_b sqrt(L_b)`` ``[B, k, directions]`` from the top eigenpairs of each
    positive semi-definite ``h_out[b]``, and the kept and the total trace."""
    evals, evecs = torch.linalg.eigh((h_out + h_out.transpose(1, 2)) / 2)  # ascending
    evals = evals.clamp_min(0)
    top = evals[:, -directions:]
    return evecs[:, :, -directions:] * top[:, None, :].sqrt(), float(top.sum()), float(evals.sum())


def _detach(tree: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)
