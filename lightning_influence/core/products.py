"""Curvature-vector products of one batch: the kernels behind :class:`Curvature`.

Hessian products (forward over reverse), Gauss-Newton products (forward-and-reverse, or from
per-example Jacobians and output Hessians), and the truncated Gauss-Newton rows.

Where ``torch.func`` refuses the model (a layer with no forward-mode derivative such as
``nn.LSTM`` on CPU or ``nn.EmbeddingBag``, a classic ``autograd.Function``), each product falls
back to plain autograd (the kernels in :mod:`.plain_autograd`, the switch recorded by
:mod:`.routes`); where even the backward pass has no derivative (``nn.EmbeddingBag``),
Gauss-Newton products come from per-example Jacobians by reverse passes. Forward-mode passes
take a block's vectors vmapped together or one per pass, as :mod:`.passes` decides.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap
from torch.utils._pytree import tree_leaves, tree_map

from lightning_influence.core.gradients import one_example, rows_of
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.passes import JACOBIAN_BYTES, VectorPasses, by_chunks
from lightning_influence.core.plain_autograd import (
    gauss_newton_double_backward,
    hessian_double_backward,
    jacobians_by_reverse_passes,
)
from lightning_influence.core.routes import refused

__all__ = [
    "detach",
    "example_jacobians",
    "flat_output",
    "gauss_newton_by_jacobians",
    "gauss_newton_method",
    "gauss_newton_products",
    "gauss_newton_rows",
    "hessian_available",
    "hessian_products",
    "output_hessians",
    "outputs_and_pullback",
    "per_example",
    "products_from_factors",
    "top_directions",
]


def hessian_products(
    fm: FunctionalModel,
    inputs: Any,
    targets: Any,
    vectors: Tensor,
    chunk: int | None = None,
    passes: VectorPasses | None = None,
) -> Tensor:
    """``H v`` for each row of ``vectors`` (forward over reverse), ``chunk`` rows at a time
    (vmapped together or one by one, as ``passes`` decides); by plain autograd (the derivative of
    the gradient along ``v``) where ``torch.func`` refuses."""
    if fm.routes.get("curvature_products") is None:
        try:
            return _hessian_forward_over_reverse(fm, inputs, targets, vectors, chunk, passes)
        except (RuntimeError, NotImplementedError) as err:
            if not refused(err):
                raise
            fm.routes.fall_back("curvature_products", "double_backward", err)
    try:
        return hessian_double_backward(fm, inputs, targets, vectors)
    except (RuntimeError, NotImplementedError) as err:
        if not refused(err):
            raise
        from lightning_influence.errors import InfluenceError  # errors -> config -> core: a cycle

        raise InfluenceError(
            "The Hessian of this model cannot be computed: an operation in it has no second "
            f"derivative in PyTorch, in forward mode or through its backward pass "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). Use "
            "curvature='gauss_newton' (the default), which needs first derivatives only."
        ) from err


def hessian_available(fm: FunctionalModel, inputs: Any, targets: Any) -> bool:
    """Whether Hessian products can be had for this model: one product on the first example of
    a batch (``False`` where an operation has no second derivative, as ``nn.EmbeddingBag``).

    Example:
        >>> import torch
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(3, 2), ClassificationTask())
        >>> hessian_available(fm, torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
        True
    """
    from lightning_influence.errors import InfluenceError  # errors -> config -> core: a cycle

    first = slice(0, 1)
    try:
        with torch.enable_grad():
            hessian_products(fm, rows_of(inputs, first), rows_of(targets, first), fm.theta[None])
    except InfluenceError:
        return False
    return True


def _hessian_forward_over_reverse(
    fm: FunctionalModel,
    inputs: Any,
    targets: Any,
    vectors: Tensor,
    chunk: int | None,
    passes: VectorPasses | None,
) -> Tensor:
    def total(th: Tensor) -> Tensor:
        return fm.losses(th, inputs, targets).sum()

    def hv(v: Tensor) -> Tensor:
        return jvp(grad(total), (fm.theta,), (v,))[1]

    return by_chunks(hv, vectors, chunk, passes)


def gauss_newton_products(
    fm: FunctionalModel,
    inputs: Any,
    targets: Any,
    out: Any,
    vectors: Tensor,
    chunk: int | None = None,
    passes: VectorPasses | None = None,
    pullback: Pullback | None = None,
) -> Tensor:
    """``J^T H_out J v``: forward mode for ``J v``, reverse mode for ``J^T``, vmapped over ``v``
    ``chunk`` rows at a time (the tangents of a pass hold ``chunk x batch`` activations), or one
    row per pass where ``passes`` found that faster; one reverse-mode graph serves every pass
    (``pullback``, from :func:`outputs_and_pullback`, where the caller has it already).

    Where ``torch.func`` refuses the model, by plain autograd (``J v`` as the derivative of a
    vector-Jacobian product), and where the backward pass itself has no derivative, from
    per-example Jacobians."""
    route = fm.routes.get("curvature_products")
    if route is None:
        try:
            return _gauss_newton_forward_and_reverse(
                fm, inputs, targets, out, vectors, chunk, passes, pullback
            )
        except (RuntimeError, NotImplementedError) as err:
            if not refused(err):
                raise
            fm.routes.fall_back("curvature_products", route := "double_backward", err)
    if route == "double_backward":
        try:
            return gauss_newton_double_backward(fm, inputs, targets, vectors)
        except (RuntimeError, NotImplementedError) as err:
            if not refused(err) or not isinstance(out, Tensor):
                raise
            fm.routes.fall_back("curvature_products", "reverse_passes", err)
    # per-example Jacobians hold examples x outputs x p numbers: a few examples at a time
    size = fm.task.batch_size(inputs)
    per_example_bytes = max(1, out[0].numel() * vectors.shape[1] * vectors.element_size())
    step = max(1, min(size, _JACOBIAN_CHUNK_BYTES // per_example_bytes))
    total = torch.zeros_like(vectors)
    for start in range(0, size, step):
        rows = slice(start, start + step)
        part = (rows_of(inputs, rows), rows_of(targets, rows), out[rows])
        total += gauss_newton_by_jacobians(fm, *part, vectors)
    return total


def outputs_and_pullback(
    fm: FunctionalModel, inputs: Any, graph: bool = True
) -> tuple[Any, Pullback | None]:
    """The model's (detached) outputs on ``inputs`` and the pullback ``u -> J^T u`` of the same
    forward pass, which a forward-and-reverse product would otherwise run again; no pullback
    without ``graph`` or where ``torch.func`` refuses the model (the outputs then from a plain
    forward pass).

    Example:
        >>> import torch
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(3, 2), ClassificationTask())
        >>> out, pullback = outputs_and_pullback(fm, torch.randn(4, 3))
        >>> out.shape, pullback(torch.ones(4, 2))[0].shape
        (torch.Size([4, 2]), torch.Size([8]))
    """
    if graph and fm.routes.get("curvature_products") is None:
        try:
            out, pullback = vjp(partial(_outputs_of, fm, inputs), fm.theta)  # type: ignore[misc]
            return detach(out), pullback
        except (RuntimeError, NotImplementedError) as err:
            if not refused(err):
                raise
    return detach(fm.outputs(fm.theta, inputs)), None


def _outputs_of(fm: FunctionalModel, inputs: Any, theta: Tensor) -> Any:
    return fm.outputs(theta, inputs)


Pullback = Callable[[Any], tuple[Tensor]]
# Per-example Jacobians of one chunk of a batch, where products are made from them: at most this.
_JACOBIAN_CHUNK_BYTES = 256 * 2**20


def _gauss_newton_forward_and_reverse(
    fm: FunctionalModel,
    inputs: Any,
    targets: Any,
    out: Any,
    vectors: Tensor,
    chunk: int | None,
    passes: VectorPasses | None = None,
    pullback: Pullback | None = None,
) -> Tensor:
    def outputs(th: Tensor) -> Any:
        return fm.outputs(th, inputs)

    if pullback is None:
        _, pullback = vjp(outputs, fm.theta)  # type: ignore[misc]

    def loss_of_outputs(o: Any) -> Tensor:
        return fm.losses_from_outputs(o, targets).sum()

    def gnv(v: Tensor) -> Tensor:
        jv = jvp(outputs, (fm.theta,), (v,))[1]
        hjv = jvp(grad(loss_of_outputs), (out,), (jv,))[1]
        return pullback(hjv)[0]

    return by_chunks(gnv, vectors, chunk, passes)


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
    if 2 * k * r + 2 * k * m < 5 * m * r and jacobian_bytes <= JACOBIAN_BYTES:
        return gauss_newton_by_jacobians
    return gauss_newton_products


def gauss_newton_by_jacobians(
    fm: FunctionalModel, inputs: Any, targets: Any, out: Tensor, vectors: Tensor
) -> Tensor:
    """``sum_b J_b^T H_b J_b v`` with per-example Jacobians ``J_b`` ``[k, p]`` and loss Hessians
    ``H_b`` ``[k, k]`` (``k`` outputs per example)."""
    jac = example_jacobians(fm, inputs)  # [B, k, p]
    h_out = output_hessians(fm, targets, out)
    jv = torch.einsum("bkp,mp->bkm", jac, vectors)
    hjv = torch.einsum("bkl,blm->bkm", h_out, jv)
    return torch.einsum("bkp,bkm->mp", jac, hjv)


def example_jacobians(fm: FunctionalModel, inputs: Any) -> Tensor:
    """Each example's Jacobian of its flattened outputs, ``[B, k, p]``: ``jacrev``, vmapped over
    the examples; by plain autograd, one reverse pass per example and output, where
    ``torch.func`` refuses the model.

    Example:
        >>> import torch
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> example_jacobians(fm, torch.randn(5, 4)).shape
        torch.Size([5, 3, 15])
    """
    if fm.routes.get("jacobians") is None:
        try:
            return per_example(torch.func.jacrev(partial(flat_output, fm)), fm.theta, inputs)
        except (RuntimeError, NotImplementedError) as err:
            if not refused(err):
                raise
            fm.routes.fall_back("jacobians", "reverse_passes", err)
    return jacobians_by_reverse_passes(fm, inputs)


def products_from_factors(jacobians: Tensor, hessians: Tensor, vectors: Tensor) -> Tensor:
    """``sum_b J_b^T H_b J_b v`` for each row ``v`` of ``vectors``, from stored factors."""
    n, k, p = jacobians.shape
    flat = jacobians.reshape(n * k, p)
    jv = (flat @ vectors.T).reshape(n, k, -1)  # [n, k, m]
    hjv = torch.bmm(hessians, jv).reshape(n * k, -1)
    # [m, n k] @ [n k, p]: a contiguous result, and faster than transposing the [n k, p] side
    return hjv.T @ flat


def flat_output(fm: FunctionalModel, theta: Tensor, example: Any) -> Tensor:
    """The outputs of one unbatched example, flattened to ``[k]``."""
    return fm.outputs(theta, one_example(example)).reshape(-1)


def output_hessians(fm: FunctionalModel, targets: Any, out: Tensor) -> Tensor:
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


def gauss_newton_rows(
    fm: FunctionalModel, inputs: Any, targets: Any, out: Tensor, directions: int
) -> tuple[list[Tensor], float, float]:
    """Rows ``r_bs = sqrt(l_bs) J_b^T u_bs`` from the top eigenpairs ``(l_bs, u_bs)`` of each
    example's output Hessian, one ``[B, p]`` block per direction ``s``, so that
    ``sum_s r_bs r_bs^T`` is ``J_b^T H_b J_b`` restricted to those directions: one per-example
    backward pass per direction. Also returns the kept and the total trace of the output
    Hessians."""
    top, kept, total = top_directions(output_hessians(fm, targets, out), directions)

    def along(th: Tensor, x: Any, cotangent: Tensor) -> Tensor:
        return (flat_output(fm, th, x) * cotangent).sum()

    if fm.routes.get("jacobians") is None:
        row = grad(along)  # one per-example backward pass per direction
        try:
            rows = [per_example(row, fm.theta, inputs, top[:, :, j]) for j in range(top.shape[2])]
            return rows, kept, total
        except (RuntimeError, NotImplementedError) as err:
            if not refused(err):
                raise
            fm.routes.fall_back("jacobians", "reverse_passes", err)
    jac = example_jacobians(fm, inputs)  # [B, k, p], by reverse passes
    rows = [torch.einsum("bkp,bk->bp", jac, top[:, :, j]) for j in range(top.shape[2])]
    return rows, kept, total


def per_example(fn: Callable[..., Tensor], theta: Tensor, *batched: Any) -> Tensor:
    """``fn(theta, *example)`` for each example of the batches, stacked: vmapped, or a loop over
    examples for a model that ``vmap`` cannot trace (a forward that calls ``.item()``, say)."""
    try:
        return vmap(fn, in_dims=(None, *([0] * len(batched))))(theta, *batched)
    except (RuntimeError, ValueError, NotImplementedError):
        leaves = [t for t in tree_leaves(batched) if isinstance(t, Tensor)]
        return torch.stack([fn(theta, *rows_of(batched, i)) for i in range(leaves[0].shape[0])])


def top_directions(h_out: Tensor, directions: int) -> tuple[Tensor, float, float]:
    """Cotangents ``C_b = U_b sqrt(L_b)`` ``[B, k, directions]`` from the top eigenpairs of each
    positive semi-definite ``h_out[b]``, and the kept and the total trace."""
    evals, evecs = torch.linalg.eigh((h_out + h_out.transpose(1, 2)) / 2)  # ascending
    evals = evals.clamp_min(0)
    top = evals[:, -directions:]
    return evecs[:, :, -directions:] * top[:, None, :].sqrt(), float(top.sum()), float(evals.sum())


def detach(tree: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)
