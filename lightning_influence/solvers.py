"""Solvers: apply ``(H + damping I)^-1`` to a block of vectors.

All solvers share one interface, :meth:`Solver.solve`, and consume the same
:class:`~lightning_influence.hvp.Curvature`. Rows of the block are independent right-hand sides
that move together, so one curvature product serves all of them.

- :class:`LiSSA`: the stochastic Neumann recursion on minibatch curvature, with momentum.
- :class:`CG`: batched conjugate gradient on full-data curvature products.
- :class:`Exact`: the explicit matrix and an eigendecomposition, for small models and tests.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_influence.hvp import Curvature

__all__ = ["CG", "Exact", "InverseOperator", "LiSSA", "Solver", "SolverDivergedError"]

Diagnostics = dict[str, float]
InverseOperator = Callable[[Tensor], Tensor]


class SolverDivergedError(RuntimeError):
    """The solver produced NaN/Inf or grew without bound."""


class Solver(ABC):
    """Applies ``(H + damping I)^-1`` to each row of a block ``[m, p]``."""

    name: str = "solver"

    @abstractmethod
    def solve(
        self, curvature: Curvature, vectors: Tensor, damping: float, progress: bool = False
    ) -> tuple[Tensor, Diagnostics]:
        """Return ``(H + damping I)^-1`` applied to each row of ``vectors``, and diagnostics."""

    def settings(self) -> dict[str, Any]:
        """The solver's settings, JSON-serialisable."""
        values = asdict(self) if hasattr(self, "__dataclass_fields__") else {}  # type: ignore[call-overload]
        return {"name": self.name, **values}


class FactorizedSolver(Solver):
    """A solver that builds the inverse once and applies it to any number of vectors."""

    @abstractmethod
    def factorize(
        self, curvature: Curvature, damping: float, progress: bool = False
    ) -> tuple[InverseOperator, Diagnostics]:
        """The inverse as a function of a block of vectors, and diagnostics."""

    def solve(
        self, curvature: Curvature, vectors: Tensor, damping: float, progress: bool = False
    ) -> tuple[Tensor, Diagnostics]:
        """Factorize, then apply to ``vectors``."""
        inverse, info = self.factorize(curvature, damping, progress)
        return inverse(vectors), info


@dataclass(frozen=True)
class Exact(FactorizedSolver):
    """The explicit curvature matrix and an eigendecomposition; for small parameter counts.

    Args:
        max_params: refuse models with more chosen parameters than this (the matrix is ``p x p``).

    Example:
        >>> Exact(max_params=2000).max_params
        2000
    """

    max_params: int = 6000
    name = "exact"

    def __post_init__(self) -> None:
        if self.max_params < 1:
            raise ValueError(f"`max_params` must be positive, got {self.max_params}.")

    def factorize(
        self, curvature: Curvature, damping: float, progress: bool = False
    ) -> tuple[InverseOperator, Diagnostics]:
        """Eigendecompose ``H + damping I``."""
        p = curvature.n_params
        if p > self.max_params:
            raise ValueError(
                f"Exact needs the full {p} x {p} curvature matrix, above `max_params="
                f"{self.max_params}`. Use `LiSSA()` or `CG()` for validation scores and "
                "`LowRank()` for self-influence, or select fewer parameters with `parameters=`."
            )
        mat = curvature.dense().double()  # the eigendecomposition in float64, whatever the dtype
        mat.diagonal().add_(damping)
        evals, evecs = torch.linalg.eigh(mat)
        if evals.abs().min() <= 1e-12 * evals.abs().max():
            raise ValueError(
                "H + damping I is singular; increase `damping` (it is "
                f"{damping:g}, smallest eigenvalue {evals.min().item():.3g})."
            )
        info = {
            "min_eigenvalue": float(evals.min()),
            "max_eigenvalue": float(evals.max()),
            "negative_eigenvalues": float((evals < 0).sum()),
        }

        def inverse(vectors: Tensor) -> Tensor:
            v = vectors.to(evecs.dtype)
            return (((v @ evecs) / evals) @ evecs.T).to(vectors.dtype)

        return inverse, info


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
        self, curvature: Curvature, vectors: Tensor, damping: float, progress: bool = False
    ) -> tuple[Tensor, Diagnostics]:
        """Run CG on every row at once."""
        b = vectors.to(curvature.model.dtype)
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
            _check_finite(alpha, "CG", damping, None)
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


@dataclass(frozen=True)
class LiSSA(Solver):
    """Stochastic Neumann recursion on minibatch curvature, all right-hand sides together.

    ``h_0 = v``, ``h_t = v + h_{t-1} - (H_B + damping I) h_{t-1} / scale``, result ``h_T / scale``
    (the form of Koh & Liang, with the damping kept as ``damping`` whatever ``scale`` is). The
    defaults need no tuning: ``scale`` from power iteration on several minibatches, ``depth`` from
    the condition number, and the average of the last ``average`` fraction of the iterates, which
    cancels the minibatch noise that otherwise caps the accuracy. Heavy-ball momentum on the same
    series is available for ill-conditioned problems.

    Args:
        depth: recursion steps per repeat; ``None`` picks three times ``scale / damping``, the
            number of steps the slowest direction needs, up to ``max_depth`` (with a warning
            when that truncates the series).
        repeats: independent chains (different minibatches) averaged together.
        batch_size: examples per minibatch curvature product.
        scale: must exceed the largest eigenvalue of every minibatch ``H_B + damping I``;
            estimated by power iteration over ``probe_batches`` minibatches, times
            ``scale_margin``, when ``None``.
        momentum: ``"auto"`` picks the heavy-ball weight from ``damping / scale``; a float fixes it.
            Momentum needs far fewer steps on ill-conditioned problems but amplifies minibatch
            noise and can diverge with small minibatches; off (0) by default.
        tol: stop early once the relative change of the averaged estimate is below this.
        average: fraction of the final iterates averaged (0 keeps the last iterate only).
        seed: seeds the minibatch draws and the power iteration.
        scale_margin: factor on the largest minibatch eigenvalue found.
        probe_batches: minibatches probed for the largest eigenvalue.
        max_depth: the most steps an automatic ``depth`` may take.

    Example:
        >>> LiSSA(depth=500, batch_size=128).repeats
        1
    """

    depth: int | None = None
    repeats: int = 1
    batch_size: int = 256
    scale: float | None = None
    momentum: float | str = 0.0
    tol: float = 1e-4
    average: float = 0.5
    seed: int = 0
    scale_margin: float = 1.25
    probe_batches: int = 8
    max_depth: int = 5000
    name = "lissa"

    def __post_init__(self) -> None:
        for arg in ("depth", "repeats", "batch_size"):
            if getattr(self, arg) is not None and getattr(self, arg) < 1:
                raise ValueError(f"`{arg}` must be a positive integer, got {getattr(self, arg)}.")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"`scale` must be positive (or None to estimate), got {self.scale}.")
        if self.momentum != "auto" and not (
            isinstance(self.momentum, int | float) and 0 <= self.momentum < 1
        ):
            raise ValueError(f"`momentum` must be 'auto' or in [0, 1), got {self.momentum!r}.")
        if not 0 <= self.average < 1:
            raise ValueError(f"`average` must be in [0, 1), got {self.average}.")

    def estimate_scale(
        self, curvature: Curvature, damping: float, generator: torch.Generator
    ) -> float:
        """``scale_margin`` times the largest eigenvalue over several minibatch curvatures.

        Minibatch curvature can be several times larger than the full-data one (rare features),
        and the recursion diverges unless ``scale`` bounds every minibatch it sees.
        """
        # decided on the global count, so every process runs the same number of products
        n_probe = self.probe_batches if curvature.n_total > self.batch_size else 1
        top = 0.0
        for _ in range(n_probe):
            batch = curvature.sample(self.batch_size, generator)

            def matvec(v: Tensor, batch: Any = batch) -> Tensor:
                return curvature.minibatch_matvec(batch, v)

            top = max(top, _top_eigenvalue(matvec, curvature.model.theta, generator))
        return self.scale_margin * (top + damping)

    def solve(
        self, curvature: Curvature, vectors: Tensor, damping: float, progress: bool = False
    ) -> tuple[Tensor, Diagnostics]:
        """Run the recursion on every row of ``vectors`` at once."""
        generator = torch.Generator().manual_seed(self.seed)
        scale = self.scale or self.estimate_scale(curvature, damping, generator)
        depth = self.depth or auto_depth(scale, damping, max_depth=self.max_depth)
        if self.depth is None and depth < 3 * scale / max(damping, 1e-12):
            warnings.warn(
                f"LiSSA: the condition number scale / damping = {scale / damping:.3g} needs about "
                f"{3 * scale / damping:.0f} steps, above `max_depth={self.max_depth}`; the result "
                "is a truncated series, which acts like a larger damping. Raise `damping`, raise "
                "`max_depth`, or use `CG()` / `Exact()` for converged scores.",
                stacklevel=2,
            )
        if self.momentum == "auto":
            root = math.sqrt(max(damping, 1e-12) / scale)
            beta, step = ((1 - root) / (1 + root)) ** 2, 4 / (1 + root) ** 2
        else:
            beta, step = float(self.momentum), 1.0 + float(self.momentum)
        v = vectors.to(curvature.model.dtype)
        limit = 1e6 * scale / max(damping, 1e-12) * v.norm(dim=1).max()
        start_avg = int(depth * (1 - self.average))
        total = torch.zeros_like(v)
        steps, rel = 0, math.inf
        bar = tqdm(total=depth * self.repeats, desc="LiSSA", disable=not progress, leave=False)
        for _ in range(self.repeats):
            h = v.clone()
            prev = h.clone() if beta else h
            avg, n_avg, last = torch.zeros_like(v), 0, None
            for t in range(1, depth + 1):
                batch = curvature.sample(self.batch_size, generator)
                # update = v - (H_B + damping I) h / scale, computed in place
                update = curvature.minibatch_matvec(batch, h)
                update.add_(h, alpha=damping).div_(-scale).add_(v)
                if beta:
                    update.mul_(step).add_(h - prev, alpha=beta)
                    h, prev = h + update, h
                else:
                    h.add_(update, alpha=step)
                steps += 1
                bar.update()
                if t % 25 == 0:
                    _check_finite(h, "LiSSA", damping, scale)
                    if bool(h.norm(dim=1).max() > limit):
                        _raise_diverged("LiSSA", damping, scale, "grew without bound")
                if t < start_avg:
                    continue
                avg += h
                n_avg += 1
                if n_avg % 50 == 0:
                    current = avg / n_avg
                    if last is not None:
                        change = (current - last).norm(dim=1) / current.norm(dim=1).clamp_min(1e-30)
                        rel = float(change.max())
                        if rel < self.tol:
                            break
                    last = current
            total += avg / n_avg if n_avg else h
        bar.close()
        result = total / (self.repeats * scale)
        _check_finite(result, "LiSSA", damping, scale)
        info = {"scale": scale, "depth": float(depth), "steps": float(steps)}
        return result, {**info, "relative_change": rel, "momentum": beta}


def _top_eigenvalue(
    matvec: Callable[[Tensor], Tensor],
    like: Tensor,
    generator: torch.Generator,
    iters: int = 30,
    rtol: float = 1e-3,
) -> float:
    """Largest eigenvalue magnitude by power iteration."""
    v = torch.randn(1, like.numel(), generator=generator, dtype=torch.float64).to(like)
    v /= v.norm()
    eig = 0.0
    for _ in range(iters):
        w = matvec(v)
        new = float(w.norm())
        v = w / max(new, 1e-30)
        if abs(new - eig) <= rtol * new:
            return new
        eig = new
    return eig


def auto_depth(scale: float, damping: float, min_depth: int = 100, max_depth: int = 5000) -> int:
    """Recursion depth for the plain series: three times the condition number ``scale / damping``.

    The slowest direction contracts by ``1 - damping / scale`` per step; the last half of the
    steps is averaged.
    """
    kappa = scale / max(damping, 1e-12)
    return int(min(max(math.ceil(3 * kappa), min_depth), max_depth))


def _check_finite(t: Tensor, solver: str, damping: float, scale: float | None) -> None:
    if not bool(torch.isfinite(t).all()):
        _raise_diverged(solver, damping, scale, "produced NaN or Inf")


def _raise_diverged(solver: str, damping: float, scale: float | None, what: str) -> None:
    hint = f"increase `scale` (it is {scale:g}) or " if scale is not None else ""
    raise SolverDivergedError(
        f"{solver} {what}. The curvature may be larger than the solver assumed or H + damping I "
        f"may not be positive definite: {hint}increase `damping` (it is {damping:g}), "
        "or use curvature='gauss_newton', which is positive semi-definite."
    )
