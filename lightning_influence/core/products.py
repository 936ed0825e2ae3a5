"""Curvature-vector products of one batch: the kernels behind :class:`Curvature`.

Hessian products (forward over reverse), Gauss-Newton products (forward-and-reverse, or from
per-example Jacobians and output Hessians), and the truncated Gauss-Newton rows.
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

__all__ = [
    "detach",
    "flat_output",
    "gauss_newton_by_jacobians",
    "gauss_newton_products",
    "gauss_newton_rows",
    "hessian_products",
    "output_hessians",
    "per_example",
    "products_from_factors",
    "top_directions",
]


def hessian_products(
    fm: FunctionalModel, inputs: Any, targets: Any, vectors: Tensor, chunk: int | None = None
) -> Tensor:
    """``H v`` for each row of ``vectors`` (forward over reverse), ``chunk`` rows at a time."""

    def total(th: Tensor) -> Tensor:
        return fm.losses(th, inputs, targets).sum()

    def hv(v: Tensor) -> Tensor:
        return jvp(grad(total), (fm.theta,), (v,))[1]

    return _by_chunks(vmap(hv), vectors, chunk)


def gauss_newton_products(
    fm: FunctionalModel,
    inputs: Any,
    targets: Any,
    out: Any,
    vectors: Tensor,
    chunk: int | None = None,
) -> Tensor:
    """``J^T H_out J v``: forward mode for ``J v``, reverse mode for ``J^T``, vmapped over ``v``
    ``chunk`` rows at a time (the tangents of a pass hold ``chunk x batch`` activations); one
    reverse-mode graph serves every chunk."""

    def outputs(th: Tensor) -> Any:
        return fm.outputs(th, inputs)

    _, pullback = vjp(outputs, fm.theta)  # type: ignore[misc]

    def loss_of_outputs(o: Any) -> Tensor:
        return fm.losses_from_outputs(o, targets).sum()

    def gnv(v: Tensor) -> Tensor:
        jv = jvp(outputs, (fm.theta,), (v,))[1]
        hjv = jvp(grad(loss_of_outputs), (out,), (jv,))[1]
        return pullback(hjv)[0]

    return _by_chunks(vmap(gnv), vectors, chunk)


def _by_chunks(products: Callable[[Tensor], Tensor], vectors: Tensor, chunk: int | None) -> Tensor:
    """``products`` of at most ``chunk`` rows at a time, in chunks of equal size (a last chunk of
    one row would cost nearly a whole pass)."""
    m = vectors.shape[0]
    if chunk is None or chunk >= m:
        return products(vectors)
    passes = -(-m // chunk)
    return torch.cat([products(rows) for rows in vectors.split(-(-m // passes))])


def gauss_newton_by_jacobians(
    fm: FunctionalModel, inputs: Any, targets: Any, out: Tensor, vectors: Tensor
) -> Tensor:
    """``sum_b J_b^T H_b J_b v`` with per-example Jacobians ``J_b`` ``[k, p]`` and loss Hessians
    ``H_b`` ``[k, k]`` (``k`` outputs per example)."""

    jacobian = torch.func.jacrev(partial(flat_output, fm))
    jac = per_example(jacobian, fm.theta, inputs)  # [B, k, p]
    h_out = output_hessians(fm, targets, out)
    jv = torch.einsum("bkp,mp->bkm", jac, vectors)
    hjv = torch.einsum("bkl,blm->bkm", h_out, jv)
    return torch.einsum("bkp,bkm->mp", jac, hjv)


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

    row = grad(along)  # one per-example backward pass per direction
    rows = [per_example(row, fm.theta, inputs, top[:, :, j]) for j in range(top.shape[2])]
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
