"""The smallest eigenvalue of a curvature, by single-vector Lanczos on all the data.

What ``curvature="auto"`` measures to decide whether ``H + damping I`` is positive definite: the
same estimate Hessian mode makes of the bottom of the spectrum (40 steps of Lanczos with full
reorthogonalisation), stopped as soon as a Ritz value falls below ``-damping``. Ritz values lie
inside the spectrum, so such a value proves the matrix indefinite, and a model far from an
optimum is told apart in a few products.
"""

from __future__ import annotations

import math

import torch

from lightning_influence.solvers.base import CurvatureOperator

__all__ = ["LANCZOS_STEPS", "smallest_eigenvalue"]

# As many steps as Hessian mode's estimate of the most negative eigenvalue takes.
LANCZOS_STEPS = 40


def smallest_eigenvalue(
    curvature: CurvatureOperator,
    below: float = -math.inf,
    steps: int = LANCZOS_STEPS,
    seed: int = 0,
) -> tuple[float, int]:
    """The smallest Ritz value of ``steps`` Lanczos steps from a random start (seeded, so every
    process draws the same one), and the products taken; it stops early once the value is below
    ``below``. It is never below the true smallest eigenvalue.

    Example:
        >>> import torch
        >>> class Diagonal:
        ...     n_params, n_total, dtype, device = 3, 1, torch.float64, torch.device("cpu")
        ...     def matvec(self, v):
        ...         return v * torch.tensor([-2.0, 1.0, 5.0], dtype=torch.float64)
        >>> value, products = smallest_eigenvalue(Diagonal())
        >>> round(value, 6), products
        (-2.0, 3)
        >>> smallest_eigenvalue(Diagonal(), below=0.0, steps=3)[0] < 0
        True
    """
    p, dtype, device = curvature.n_params, curvature.dtype, curvature.device
    steps = min(steps, p)
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(1, p, generator=generator, dtype=torch.float64)
    q = (start / start.norm()).to(dtype=dtype, device=device)
    basis = torch.zeros(steps, p, dtype=dtype, device=device)
    diagonal: list[float] = []
    off: list[float] = []
    smallest = math.inf
    for k in range(steps):
        basis[k] = q[0]
        w = curvature.matvec(q)
        diagonal.append(float((w * q).sum()))
        if not math.isfinite(diagonal[-1]):  # a non-finite example: the solver names it
            return math.nan, k + 1
        tri = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
        if off:
            band = torch.tensor(off, dtype=torch.float64)
            tri += torch.diag(band, 1) + torch.diag(band, -1)
        smallest = float(torch.linalg.eigvalsh(tri)[0])
        if smallest < below or k + 1 == steps:
            return smallest, k + 1
        kept = basis[: k + 1]
        for _ in range(2):  # full reorthogonalisation, twice (classical Gram-Schmidt)
            w = w - (w @ kept.T) @ kept
        norm = float(w.norm())
        if norm <= 1e-10 * max(abs(d) for d in diagonal):  # an invariant subspace: exact
            return smallest, k + 1
        off.append(norm)
        q = w / norm
    return smallest, steps
