"""``LiSSA``: the stochastic Neumann recursion on minibatch curvature."""

from __future__ import annotations

import math
import warnings
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

__all__ = ["LiSSA", "auto_depth"]


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
        self, curvature: CurvatureOperator, damping: float, generator: torch.Generator
    ) -> float:
        """``scale_margin`` times the largest eigenvalue over several minibatch curvatures.

        Minibatch curvature can be several times larger than the full-data one (rare features),
        and the recursion diverges unless ``scale`` bounds every minibatch it sees.
        """
        # decided on the global count, so every process runs the same number of products
        n_probe = self.probe_batches if curvature.n_total > self.batch_size else 1
        top = 0.0
        for _ in range(n_probe):
            matvec = curvature.minibatch(self.batch_size, generator)
            top = max(top, _top_eigenvalue(matvec, curvature, generator))
        return self.scale_margin * (top + damping)

    def solve(
        self, curvature: CurvatureOperator, vectors: Tensor, damping: float, progress: bool = False
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
        v = vectors.to(curvature.dtype)
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
                # update = v - (H_B + damping I) h / scale, computed in place
                update = curvature.minibatch(self.batch_size, generator)(h)
                update.add_(h, alpha=damping).div_(-scale).add_(v)
                if beta:
                    update.mul_(step).add_(h - prev, alpha=beta)
                    h, prev = h + update, h
                else:
                    h.add_(update, alpha=step)
                steps += 1
                bar.update()
                if t % 25 == 0:
                    check_finite(h, "LiSSA", damping, scale)
                    if bool(h.norm(dim=1).max() > limit):
                        raise_diverged("LiSSA", damping, scale, "grew without bound")
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
        check_finite(result, "LiSSA", damping, scale)
        info = {"scale": scale, "depth": float(depth), "steps": float(steps)}
        return result, {**info, "relative_change": rel, "momentum": beta}


def _top_eigenvalue(
    matvec: Callable[[Tensor], Tensor],
    curvature: CurvatureOperator,
    generator: torch.Generator,
    iters: int = 30,
    rtol: float = 1e-3,
) -> float:
    """Largest eigenvalue magnitude by power iteration."""
    v = torch.randn(1, curvature.n_params, generator=generator, dtype=torch.float64)
    v = v.to(dtype=curvature.dtype, device=curvature.device)
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
