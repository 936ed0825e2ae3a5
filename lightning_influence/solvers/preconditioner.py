"""LiSSA's preconditioner: which factorization it is built from, and ``P^-1`` from it.

With the top eigenpairs ``(U, l)`` of the curvature,
``P^-1 = U diag(1/(l + damping)) U^T + (I - U U^T) / (l_k + damping)``: the preconditioned
system's condition number is set by ``(l_k + damping) / damping`` instead of
``(l_1 + damping) / damping``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_influence.solvers.base import Diagnostics
from lightning_influence.solvers.lowrank import LowRank, LowRankInverse

__all__ = ["PRECONDITIONER", "Preconditioner"]

# The default preconditioner: exact Gauss-Newton products on up to 1,024 examples, and the rank
# grown until the curvature left beyond it is at most 5 times the damping (within 1 GiB of
# working memory, `LowRank.max_memory`).
PRECONDITIONER = LowRank(max_examples=1024, output_directions=None, max_condition=5.0)


class Preconditioner:
    """``P^-1`` from a low-rank factorization and its diagnostics, applied to blocks of rows.

    ``floor`` is ``l_k + damping`` (``P`` on the space beyond the kept eigenvectors) and
    ``smallest`` the smallest eigenvalue of ``H + damping I`` the factorization saw; a
    non-positive one raises, naming the damping that would do.

    Example:
        >>> import torch
        >>> inverse = LowRankInverse(torch.eye(3)[:1], torch.tensor([3.0]), damping=1.0)
        >>> precondition = Preconditioner(inverse, {}, damping=1.0)
        >>> precondition(torch.ones(1, 3))  # 1 / (3 + 1) on the kept vector, 1 / 4 elsewhere
        tensor([[0.2500, 0.2500, 0.2500]])
    """

    def __init__(self, inverse: LowRankInverse, info: Diagnostics, damping: float) -> None:
        self.evecs, self.evals, self.damping = inverse.evecs, inverse.evals, damping
        self.full_rank = self.evecs.shape[0] >= self.evecs.shape[1]
        self.floor = float(self.evals[-1]) + damping  # P^-1 on the rest of the space is 1 / floor
        self.smallest = float(info.get("most_negative_eigenvalue", 0.0)) + damping
        if self.smallest <= 0:
            raise ValueError(
                f"H + damping I is not positive definite: the curvature has an eigenvalue near "
                f"{self.smallest - damping:.3g}, below -damping = {-damping:g}. Pass "
                f"`damping={2 * (damping - self.smallest):.3g}` or more, or use "
                "curvature='gauss_newton', which is positive semi-definite."
            )

    def __call__(self, x: Tensor) -> Tensor:
        """``P^-1 x``, with one new ``[rows, p]`` block."""
        evecs, evals, damping = self.evecs, self.evals, self.damping
        coords = x @ evecs.T
        if self.full_rank:
            return (coords / (evals + damping)) @ evecs
        rest = torch.addmm(x, coords, evecs, alpha=-1.0).div_(self.floor)
        return rest.addmm_(coords / (evals + damping), evecs)
