"""The preconditioned LiSSA recursion: heavy ball on minibatch curvature with full-data
residuals as control variates, then preconditioned conjugate gradients on all the data.

:class:`~lightning_influence.LiSSA` holds the settings; this module runs them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_influence.solvers.base import (
    CurvatureOperator,
    Diagnostics,
    check_finite,
    raise_diverged,
)
from lightning_influence.solvers.lowrank import LowRankInverse
from lightning_influence.solvers.preconditioner import Preconditioner
from lightning_influence.solvers.refinement import System, all_data, product_dtype
from lightning_influence.solvers.stopping import Stopping

if TYPE_CHECKING:
    from lightning_influence.solvers.lissa import LiSSA

__all__ = ["FULL_DATA_MARGIN", "preconditioned", "scale_and_direction", "top_eigenvalue"]

# the scale's margin on all the data: no minibatch to bound, only the power iteration's tolerance
FULL_DATA_MARGIN = 1.1


def preconditioned(
    lissa: LiSSA,
    curvature: CurvatureOperator,
    vectors: Tensor,
    damping: float,
    progress: bool,
    inverse: LowRankInverse,
    factor_info: Diagnostics,
    stop: Stopping,
) -> tuple[Tensor, Diagnostics]:
    """The preconditioned recursion with momentum, window averages and residual checks on
    minibatches; preconditioned conjugate gradients once all the data is used. ``stop`` sees
    every check (each window's residual, each conjugate-gradient step) and ends the solve."""
    precondition = Preconditioner(inverse, factor_info, damping)
    floor, smallest = precondition.floor, precondition.smallest
    generator = torch.Generator().manual_seed(lissa.seed)
    top_direction: Tensor | None = None  # the last power iteration's, to start the next one from
    tuning: Diagnostics = {}  # the minibatches' scale, condition number and momentum

    def tuned(batch_size: int) -> tuple[float, float, float, float]:
        """``scale``, the condition number, the momentum and the step for this batch size."""
        nonlocal top_direction
        scale = lissa.scale
        if scale is None:
            scale, top_direction = scale_and_direction(
                lissa, curvature, damping, generator, batch_size, precondition, top_direction
            )
        kappa = scale / (smallest / floor)  # condition number of the preconditioned system
        if lissa.momentum in ("auto", None):
            root = math.sqrt(1 / kappa)
            beta, step = ((1 - root) / (1 + root)) ** 2, 4 / (1 + root) ** 2
        else:
            beta, step = float(lissa.momentum), 1.0 + float(lissa.momentum)
        tuning.update(scale=scale, preconditioned_condition_number=kappa, momentum=beta)
        return scale, kappa, beta, step

    n_total = curvature.n_total
    batch_size = min(lissa.batch_size, n_total)
    v = vectors.to(dtype=curvature.dtype, device=curvature.device)
    target = precondition(v).norm(dim=1).clamp_min(1e-30)

    def residual(x: Tensor) -> tuple[Tensor, Tensor]:
        """The full-data residual ``v - (H + damping I) x`` and its relative preconditioned size."""
        r = curvature.matvec(x).add_(x, alpha=damping).neg_().add_(v)
        return r, precondition(r).norm(dim=1) / target

    # Start from P^-1 v, scaled per row to minimise the error in the (H + damping I) norm:
    # exact where P matches the curvature, never worse than starting from zero.
    start_dir = precondition(v)
    image = curvature.matvec(start_dir) + damping * start_dir
    energy = (start_dir * image).sum(1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    alpha = (start_dir * v).sum(1, keepdim=True) / energy
    x, r = alpha * start_dir, v - alpha * image
    rel = precondition(r).norm(dim=1) / target
    depth = lissa.depth or 1000
    start_rel, steps, checks, cg_steps = float(rel.max()), 0, 1, 0
    stop.check(x, rel, steps)

    def window_length(batch_size: int) -> int:
        """Steps per residual check: ``check_every``, and at least a pass over the data in
        minibatches, so that checks never cost most of the solve."""
        return max(lissa.check_every, math.ceil(n_total / batch_size))

    def expected_contraction(n_steps: int) -> float:
        """Log-contraction of the residual over ``n_steps`` noise-free steps at the current
        condition number (heavy ball's rate)."""
        root = math.sqrt(kappa)
        return n_steps * math.log((root + 1) / max(root - 1, 1e-12))

    def minibatches_pay(gain: float) -> bool:
        """Whether a minibatch window's log-contraction ``gain`` is more per pass over the data
        (its products plus the residual after it) than full-data steps would gain (at heavy
        ball's rate; conjugate gradients do at least as well)."""
        passes = window * batch_size / n_total + 1
        return gain / passes >= expected_contraction(window) / (window + 1)

    if n_total < lissa.check_every * batch_size:
        # A window of `check_every` minibatch steps would cost more products than a pass over
        # the data, for less than as many full-data steps gain: all the data from the start.
        batch_size = n_total
    if batch_size < n_total:
        scale, kappa, beta, step = tuned(batch_size)
        window = window_length(batch_size)
        # What one minibatch gets wrong about the curvature along the start direction bounds
        # what a minibatch window can gain; when full-data steps would gain more per pass over
        # the data (small training sets), start with them.
        sample = curvature.minibatch(batch_size, generator)(start_dir)
        sample.add_(start_dir, alpha=damping).sub_(image)
        noise = float((precondition(sample).norm(dim=1) / precondition(image).norm(dim=1)).max())
        if not minibatches_pay(min(expected_contraction(window), -math.log(max(noise, 1e-12)))):
            batch_size = n_total
        del sample
    del start_dir, image
    bar = tqdm(total=depth, desc="LiSSA", disable=not progress, leave=False)
    while not stop.done and steps < depth and batch_size < n_total:
        window = min(window, depth - steps)
        # Working blocks updated in place: h, prev, diff and the window average, and two for
        # each step's products, beside v, x and r.
        h, diff, prev, avg = x.clone(), torch.empty_like(x), x.clone(), torch.zeros_like(v)
        n_avg = 0
        for t in range(window):
            # The residual at h, from the full one at x and the minibatch curvature on h - x: its
            # noise shrinks with h - x, so the recursion has no noise floor (a control variate).
            torch.sub(h, x, out=diff)
            update = curvature.minibatch(batch_size, generator)(diff)
            update.add_(diff, alpha=damping).neg_().add_(r)
            update = precondition(update).mul_(step / scale)
            if beta:
                update.add_(h, alpha=beta).sub_(prev, alpha=beta)
            prev.copy_(h)
            h.add_(update)
            del update
            if 2 * t >= window - 1:
                avg += h
                n_avg += 1
        steps += window
        bar.update(window)
        new_x = avg.div_(n_avg)
        del h, prev, diff
        if stop.settled is not None and bool(stop.settled.any()):  # settled rows stay as they are
            new_x[stop.settled.to(new_x.device)] = x[stop.settled.to(x.device)]
        check_finite(new_x, "LiSSA", damping, scale)
        new_r, new_rel = residual(new_x)
        checks += 1
        if float(new_rel.max()) > 1e3 * max(start_rel, 1.0):
            raise_diverged("LiSSA", damping, scale, "grew without bound")
        # measured log-contraction of the residual per full-data pass of products
        contraction = math.log(float(rel.max()) / max(float(new_rel.max()), 1e-30))
        # Minibatches pay off while they gain more per pass over the data than full-data steps
        # would at this condition number (else: all the data from now on). A window that gains
        # less than half what the condition number allows is held back by minibatch noise
        # (else: by the condition number, which larger minibatches do not change).
        if not minibatches_pay(contraction):
            batch_size = n_total
        elif contraction < expected_contraction(window) / 2:
            batch_size = min(2 * batch_size, n_total)
            if batch_size < n_total:
                scale, kappa, beta, step = tuned(batch_size)
        window = window_length(batch_size)
        moved = float(new_rel.max()) < float(rel.max())
        if moved:
            x, r, rel = new_x, new_r, new_rel
        stop.check(x, rel, steps, moved)
        stop.show(bar)

    def watch(x: Tensor, cg_rel: Tensor, n: int) -> Tensor:
        """The stopping rule after each conjugate-gradient step: the rows that are done."""
        done = stop.check(x, cg_rel, steps + n)
        stop.show(bar)
        settled = stop.settled
        return torch.ones_like(cg_rel, dtype=torch.bool) if done or settled is None else settled

    # All the data: the system is deterministic, and conjugate gradients need neither a scale
    # nor momentum; most of their products in bfloat16 where that is fast (:mod:`.refinement`).
    dtype = product_dtype(lissa.product_dtype, curvature)
    system = System(curvature, damping, target, precondition, residual, watch, stop, bar)
    x, n, n_checks, precision = all_data(system, (x, r, rel), depth - steps, dtype)
    steps, cg_steps, checks = steps + n, cg_steps + n, checks + n_checks
    bar.close()
    stop.warn(lissa.budget_text())
    info: Diagnostics = {
        **tuning,
        "steps": float(steps),
        "conjugate_gradient_steps": float(cg_steps),
        "residual_checks": float(checks),
        **stop.diagnostics(),
        "final_batch_size": float(batch_size),
        **precision,
        **{f"preconditioner_{k}": val for k, val in factor_info.items()},
    }
    return x, info


def scale_and_direction(
    lissa: LiSSA,
    curvature: CurvatureOperator,
    damping: float,
    generator: torch.Generator,
    batch_size: int,
    precondition: Callable[[Tensor], Tensor] | None = None,
    start: Tensor | None = None,
) -> tuple[float, Tensor]:
    """``scale_margin`` times the largest eigenvalue of ``P^-1 (H_B + damping I)`` over
    ``probe_batches`` minibatches of ``batch_size`` (``P = I`` without ``precondition``), and the
    top direction found; each power iteration starts from the previous one's direction (from
    ``start`` for the first), which converges in a few products when the minibatches are
    alike."""
    # decided on the global count, so every process runs the same number of products
    n_probe = min(lissa.probe_batches, -(-curvature.n_total // batch_size))
    top, direction = 0.0, start
    for _ in range(n_probe):
        matvec: Callable[[Tensor], Tensor] = curvature.matvec  # all data, in batches
        if batch_size < curvature.n_total:
            matvec = curvature.minibatch(batch_size, generator)
        if precondition is None:
            eig, direction = top_eigenvalue(matvec, curvature, generator, direction)
            top = max(top, eig + damping)
        else:

            def system(x: Tensor, matvec: Callable[[Tensor], Tensor] = matvec) -> Tensor:
                return precondition(matvec(x) + damping * x)

            eig, direction = top_eigenvalue(system, curvature, generator, direction)
            top = max(top, eig)
    assert direction is not None  # at least one probe
    # all the data: no minibatch to bound, only the power iteration's tolerance
    margin = lissa.scale_margin if batch_size < curvature.n_total else FULL_DATA_MARGIN
    return margin * top, direction


def top_eigenvalue(
    matvec: Callable[[Tensor], Tensor],
    curvature: CurvatureOperator,
    generator: torch.Generator,
    start: Tensor | None = None,
    iters: int = 30,
    rtol: float = 1e-2,
) -> tuple[float, Tensor]:
    """Largest eigenvalue magnitude by power iteration (from ``start``, else a random vector),
    and its direction."""
    if start is None:
        start = torch.randn(1, curvature.n_params, generator=generator, dtype=torch.float64)
    v = start.to(dtype=curvature.dtype, device=curvature.device)
    v = v / v.norm()
    eig = 0.0
    for _ in range(iters):
        w = matvec(v)
        new = float(w.norm())
        v = w / max(new, 1e-30)
        if abs(new - eig) <= rtol * new:
            return new, v
        eig = new
    return eig, v
