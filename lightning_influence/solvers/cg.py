"""``CG``: batched conjugate gradient on full-data curvature products."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_influence.solvers.base import CurvatureOperator, Diagnostics, Solver, check_finite

__all__ = ["CG"]


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
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(1)
        bnorm = b.norm(dim=1).clamp_min(1e-30)
        steps = 0
        bar = tqdm(total=self.max_iter, desc="CG", disable=not progress, leave=False)
        for steps in range(1, self.max_iter + 1):  # noqa: B007
            ap = curvature.matvec(p) + damping * p
            denom = (p * ap).sum(1)
            active = rs.sqrt() > self.tol * bnorm
            alpha = torch.where(active, rs / denom.where(active, torch.ones_like(denom)), 0.0)
            check_finite(alpha, "CG", damping, None)
            x += alpha[:, None] * p
            r -= alpha[:, None] * ap
            rs_new = (r * r).sum(1)
            bar.update()
            if bool((rs_new.sqrt() <= self.tol * bnorm).all()):
                rs = rs_new
                break
            beta = torch.where(active, rs_new / rs.clamp_min(1e-300), 0.0)
            p = r + beta[:, None] * p
            rs = rs_new
        bar.close()
        rel = float((rs.sqrt() / bnorm).max())
        return x, {"steps": float(steps), "relative_residual": rel}
