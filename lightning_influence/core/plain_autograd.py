"""Curvature products and Jacobians by plain autograd, where ``torch.func`` refuses the model.

A layer with no forward-mode derivative (``nn.LSTM`` on CPU, ``nn.EmbeddingBag``) or a classic
``autograd.Function`` makes the ``torch.func`` kernels of :mod:`.products` fail; these give the
same numbers with first and second reverse passes only: a Hessian product as the derivative of
the gradient, a Jacobian-vector product as the derivative of a vector-Jacobian product, and,
where even the backward pass has no derivative (``nn.EmbeddingBag``), per-example Jacobians one
reverse pass per example and output. :mod:`.products` decides when (see :mod:`.routes`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_influence.core.gradients import one_example
from lightning_influence.core.model import FunctionalModel

__all__ = [
    "gauss_newton_double_backward",
    "hessian_double_backward",
    "jacobians_by_reverse_passes",
]


def hessian_double_backward(
    fm: FunctionalModel, inputs: Any, targets: Any, vectors: Tensor
) -> Tensor:
    """``H v`` as the derivative of the gradient along each ``v``: one reverse pass through the
    gradient's graph per row, plain autograd only."""
    theta = fm.theta.detach().requires_grad_(True)
    total = fm.losses(theta, inputs, targets).sum()
    (gradient,) = torch.autograd.grad(total, theta, create_graph=True)
    if not gradient.requires_grad:  # the loss is linear in theta: no curvature
        return torch.zeros_like(vectors)
    rows = [
        torch.autograd.grad(gradient, theta, v, retain_graph=True, materialize_grads=True)[0]
        for v in vectors
    ]
    return torch.stack(rows).detach()


def gauss_newton_double_backward(
    fm: FunctionalModel, inputs: Any, targets: Any, vectors: Tensor
) -> Tensor:
    """``J^T H_out J v`` by plain autograd: ``J v`` as the derivative of ``J^T u`` with respect to
    ``u`` along ``v`` (needs the backward pass to be differentiable, not forward mode), ``H_out``
    as the derivative of the output gradient, ``J^T`` one reverse pass; per row of ``vectors``."""
    theta = fm.theta.detach().requires_grad_(True)
    leaves, spec = tree_flatten(fm.outputs(theta, inputs))
    diff = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.is_floating_point()]
    outs = [leaves[i] for i in diff]
    dummies = [torch.zeros_like(o, requires_grad=True) for o in outs]
    pulled = torch.autograd.grad(outs, theta, dummies, create_graph=True, allow_unused=True)[0]
    if pulled is None:  # the outputs do not depend on theta
        return torch.zeros_like(vectors)
    # the loss Hessian in output space, as the derivative of the output gradient
    free = [o.detach().requires_grad_(True) for o in outs]
    held = list(leaves)
    for i, o in zip(diff, free, strict=True):
        held[i] = o
    loss = fm.losses_from_outputs(tree_unflatten(held, spec), targets).sum()
    output_grads = torch.autograd.grad(loss, free, create_graph=True)
    rows = []
    for v in vectors:
        jv = torch.autograd.grad(
            pulled, dummies, v, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        hjv = torch.autograd.grad(
            output_grads, free, jv, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        row = torch.autograd.grad(
            outs, theta, hjv, retain_graph=True, allow_unused=True, materialize_grads=True
        )[0]
        rows.append(row)
    return torch.stack(rows).detach()


def jacobians_by_reverse_passes(fm: FunctionalModel, inputs: Any) -> Tensor:
    """Per-example Jacobians ``[B, k, p]``: one forward pass per example, one reverse pass per
    output (plain autograd, first derivatives only)."""
    blocks = []
    for i in range(fm.task.batch_size(inputs)):
        theta = fm.theta.detach().requires_grad_(True)
        out = fm.outputs(theta, one_example(inputs, i)).reshape(-1)
        rows = [
            torch.autograd.grad(
                out[j], theta, retain_graph=True, allow_unused=True, materialize_grads=True
            )[0]
            for j in range(out.numel())
        ]
        blocks.append(torch.stack(rows))
    return torch.stack(blocks).detach()
