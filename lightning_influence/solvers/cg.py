"""``CG``: batched conjugate gradient on full-data curvature products."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_influence.solvers.base import (
    CurvatureOperator,
    Diagnostics,
    Solver,
    check_finite,
    raise_diverged,
)

__all__ = ["CG", "advance", "conjugate_gradients"]


@dataclass(frozen=True)
class CG(Solver):
    """Batched conjugate gradient on full-data curvature products.

    Args:
        max_iter: at most this many iterations (each one full pass over the training data).
        tol: stop when every residual norm is below ``tol`` times its right-hand side's norm.

    Example:
        >>> CG(max_iter=50).tol
        1e-06
    """

    max_iter: int = 100
    tol: float = 1e-6
    name = "cg"

    def solve(
        self, curvature: CurvatureOperator, vectors: Tensor, damping: float, progress: bool = False
    ) -> tuple[Tensor, Diagnostics]:
        """Run CG on every row at once."""
        b = vectors.to(curvature.dtype)
        bar = tqdm(total=self.max_iter, desc="CG", disable=not progress, leave=False)
        x, rel, steps = conjugate_gradients(
            curvature, damping, torch.zeros_like(b), b.clone(), b.norm(dim=1).clamp_min(1e-30),
            self.tol, self.max_iter, bar, name="CG",
        )  # fmt: skip
        bar.close()
        return x, {"steps": float(steps), "relative_residual": float(rel.max())}


def conjugate_gradients(
    curvature: CurvatureOperator,
    damping: float,
    x: Tensor,
    r: Tensor,
    target: Tensor,
    tol: float,
    max_steps: int,
    bar: tqdm,
    precondition: Callable[[Tensor], Tensor] | None = None,
    name: str = "CG",
    on_step: Callable[[Tensor, Tensor, int], Tensor] | None = None,
    done: Tensor | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Conjugate gradients on ``(H + damping I) x = b`` from ``x`` with residual ``r``, each row
    its own system, preconditioned by ``precondition`` when given, until every relative
    residual ``|P^-1 r| / target`` is below ``tol`` (``P = I`` without one) or ``on_step``
    (called with ``x``, the residuals and the steps after each step) returns True for every
    row; returns ``x``, those residuals (recurred, not recomputed) and the steps (full-data
    products). A row that is done (``on_step``'s answer, or ``done`` from the start) takes no
    more products: only the others are multiplied.

    Example:
        >>> from types import SimpleNamespace
        >>> matrix = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
        >>> curvature = SimpleNamespace(matvec=lambda v: v @ matrix)  # products are all it needs
        >>> b = torch.ones(1, 2)
        >>> x, rel, steps = conjugate_gradients(
        ...     curvature, 0.0, torch.zeros_like(b), b.clone(), b.norm(dim=1), 1e-6, 10,
        ...     tqdm(disable=True))
        >>> x, steps
        (tensor([[0.5000, 0.2500]]), 2)
    """
    z = r if precondition is None else precondition(r)
    rel = z.norm(dim=1) / target
    p, rz = z, (r * z).sum(1)
    steps = 0
    finished = torch.zeros_like(rel, dtype=torch.bool)
    if done is not None:
        finished |= done.to(finished.device)
    while steps < max_steps:
        active = (rel > tol) & ~finished
        if not bool(active.any()):
            break
        if bool(active.all()):
            ap = curvature.matvec(p).add_(p, alpha=damping)
        else:  # rows that are done take no products
            ap = torch.zeros_like(p)
            ap[active] = curvature.matvec(p[active]).add_(p[active], alpha=damping)
        curv = (p * ap).sum(1)
        if bool((curv[active] <= 0).any()):
            raise_diverged(name, damping, None, "met a direction of non-positive curvature")
        alpha = torch.where(active, rz / curv.where(active, torch.ones_like(curv)), 0.0)
        check_finite(alpha, name, damping, None)
        x, r, z, p, rz = advance(x, r, p, ap, alpha, rz, active, precondition)
        del ap
        rel = z.norm(dim=1) / target
        steps += 1
        bar.update()
        if on_step is not None:
            finished = on_step(x, rel, steps).to(finished.device)
    return x, rel, steps


def advance(
    x: Tensor,
    r: Tensor,
    p: Tensor,
    ap: Tensor,
    alpha: Tensor,
    rz: Tensor,
    active: Tensor,
    precondition: Callable[[Tensor], Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One conjugate-gradient update of every row from the step sizes ``alpha`` and the products
    ``ap = (H + damping I) p``: the new iterate, residual, preconditioned residual ``z``,
    direction and ``r . z``; rows not ``active`` keep their direction's weight at zero.

    Example:
        >>> one = torch.ones(1, 2)
        >>> advance(0 * one, one, one, 2 * one, torch.tensor([0.5]), torch.tensor([2.0]),
        ...         torch.tensor([True]), None)[0]
        tensor([[0.5000, 0.5000]])
    """
    x = x + alpha[:, None] * p
    r = r - alpha[:, None] * ap
    z = r if precondition is None else precondition(r)
    rz_new = (r * z).sum(1)
    beta = torch.where(active, rz_new / rz.clamp_min(torch.finfo(rz.dtype).tiny), 0.0)
    return x, r, z, z + beta[:, None] * p, rz_new
