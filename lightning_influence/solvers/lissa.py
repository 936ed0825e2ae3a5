"""``LiSSA``: the stochastic Neumann recursion on minibatch curvature."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

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
from lightning_influence.solvers.cg import conjugate_gradients
from lightning_influence.solvers.lowrank import LowRank, LowRankInverse
from lightning_influence.validation import check_positive_int

__all__ = ["PRECONDITIONER", "LiSSA", "auto_depth"]

# The default preconditioner: exact Gauss-Newton products on up to 1,024 examples, and the rank
# grown until the curvature left beyond it is at most 5 times the damping (within 64 MiB).
PRECONDITIONER = LowRank(max_examples=1024, output_directions=None, max_condition=5.0)


@dataclass(frozen=True)
class LiSSA(Solver):
    """Stochastic Neumann recursion on minibatch curvature, all right-hand sides together.

    **Preconditioned (the default).** With the top eigenpairs ``(U, l)`` of the curvature from
    ``preconditioner`` (a randomized Nystrom sketch, the same factorization that serves
    self-influence), ``P^-1 = U diag(1/(l + damping)) U^T + (I - U U^T) / (l_k + damping)`` and
    ``h <- h + (P^-1 (v - (H_B + damping I) h)) / scale``, with heavy-ball momentum and
    minibatch curvature ``H_B``. It converges at a rate set by ``(l_k + damping) / damping``
    instead of ``(l_1 + damping) / damping``: tens of steps where the plain series needs
    thousands. It starts from the best multiple of ``P^-1 v``. Steps come in windows (at least
    ``check_every`` steps and a pass over the data in minibatches); after each the full-data
    residual is measured (at the average of the window's last half), the solve stops once it
    is below ``tol`` (relative, preconditioned), and the next window's steps use it as a control
    variate (no minibatch noise floor). A window that gains less than half what the condition
    number allows doubles the minibatch (noise); once minibatch windows gain, or by one
    minibatch's error along the start direction would gain, less per pass over the data than
    full-data steps, the solve goes on with all the data (small training sets: from the start),
    where the system is deterministic and it finishes with preconditioned conjugate gradients
    (fewer products than heavy ball at the same rate bound, and no scale to estimate), each row
    on its own, checked against a full residual at the end.

    **Plain** (``preconditioner=None``): Koh & Liang's recursion ``h_0 = v``,
    ``h_t = v + h_{t-1} - (H_B + damping I) h_{t-1} / scale``, result ``h_T / scale``, with the
    damping kept as ``damping`` whatever ``scale`` is (their code writes ``(1 - damping) h``, a
    damping of ``damping * scale`` in our terms). ``depth`` defaults to three times
    ``scale / damping`` (up to ``max_depth``, with a warning when that truncates the series) and
    the last ``average`` fraction of the iterates is averaged. To reproduce their settings pass
    ``LiSSA(preconditioner=None, scale=their_scale, depth=their_depth, average=0, momentum=0)``
    and ``damping=their_damping * their_scale``.

    Args:
        preconditioner: the low-rank factorization to precondition with (``PRECONDITIONER``:
            exact Gauss-Newton products on up to 1,024 examples, rank grown until
            ``l_k <= 5 damping`` within 64 MiB); ``None`` for plain LiSSA.
        depth: the most recursion steps per repeat; ``None``: 1,000 when preconditioned, else
            three times ``scale / damping`` up to ``max_depth``.
        repeats: independent chains (different minibatches) averaged together (plain only).
        batch_size: examples per minibatch curvature product (preconditioned: doubled when
            minibatch noise holds the residual back, all the data once that gains more).
        scale: must exceed the largest eigenvalue of every minibatch ``H_B + damping I`` (plain)
            or ``P^-1 (H_B + damping I)`` (preconditioned); estimated by power iteration over
            ``probe_batches`` minibatches, times ``scale_margin``, when ``None``.
        momentum: ``"auto"`` picks the heavy-ball weight from the condition number; a float fixes
            it; ``None`` means ``"auto"`` when preconditioned and 0 for plain LiSSA.
        tol: preconditioned: stop once every relative residual ``|P^-1 r| / |P^-1 v|`` is below
            this; plain: once the relative change of the averaged estimate is.
        average: plain only: fraction of the final iterates averaged (0 keeps the last one).
        seed: seeds the minibatch draws and the power iteration.
        scale_margin: factor on the largest minibatch eigenvalue found (1.1 on all the data).
        probe_batches: minibatches probed for the largest eigenvalue.
        max_depth: the most steps an automatic plain ``depth`` may take.
        check_every: preconditioned: the fewest steps between full-data residual checks.
        max_block_memory: preconditioned: bytes the working copies of the validation block may
            take (about nine ``[rows, p]`` blocks); a larger block is solved in chunks of rows.

    Example:
        >>> LiSSA(depth=500, batch_size=128).preconditioner.max_condition
        5.0
    """

    preconditioner: LowRank | None = field(default_factory=lambda: PRECONDITIONER)
    depth: int | None = None
    repeats: int = 1
    batch_size: int = 256
    scale: float | None = None
    momentum: float | Literal["auto"] | None = None
    tol: float = 3e-3
    average: float = 0.5
    seed: int = 0
    scale_margin: float = 1.25
    probe_batches: int = 8
    max_depth: int = 5000
    check_every: int = 10
    max_block_memory: int = 2**30
    name = "lissa"

    def __post_init__(self) -> None:
        for arg in ("depth", "repeats", "batch_size", "check_every", "max_block_memory"):
            check_positive_int(arg, getattr(self, arg), allow_none=arg == "depth")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"`scale` must be positive (or None to estimate), got {self.scale}.")
        if self.momentum not in ("auto", None) and not (
            isinstance(self.momentum, int | float) and 0 <= self.momentum < 1
        ):
            raise ValueError(
                f"`momentum` must be 'auto', None or in [0, 1), got {self.momentum!r}."
            )
        if not 0 <= self.average < 1:
            raise ValueError(f"`average` must be in [0, 1), got {self.average}.")
        if not self.tol > 0:
            raise ValueError(f"`tol` must be positive, got {self.tol!r}.")

    def estimate_scale(
        self,
        curvature: CurvatureOperator,
        damping: float,
        generator: torch.Generator,
        precondition: Callable[[Tensor], Tensor] | None = None,
    ) -> float:
        """``scale_margin`` times the largest eigenvalue of ``P^-1 (H_B + damping I)`` over several
        minibatches (``P = I`` without ``precondition``).

        Minibatch curvature can be several times larger than the full-data one (rare features),
        and the recursion diverges unless ``scale`` bounds every minibatch it sees.
        """
        return self._scale_and_direction(curvature, damping, generator, precondition)[0]

    def _scale_and_direction(
        self,
        curvature: CurvatureOperator,
        damping: float,
        generator: torch.Generator,
        precondition: Callable[[Tensor], Tensor] | None = None,
        start: Tensor | None = None,
    ) -> tuple[float, Tensor]:
        """:meth:`estimate_scale` and the top direction found; each power iteration starts from
        the previous one's direction (from ``start`` for the first), which converges in a few
        products when the minibatches are alike."""
        # decided on the global count, so every process runs the same number of products
        n_probe = min(self.probe_batches, -(-curvature.n_total // self.batch_size))
        top, direction = 0.0, start
        for _ in range(n_probe):
            matvec: Callable[[Tensor], Tensor] = curvature.matvec  # all data, in batches
            if self.batch_size < curvature.n_total:
                matvec = curvature.minibatch(self.batch_size, generator)
            if precondition is None:
                eig, direction = _top_eigenvalue(matvec, curvature, generator, direction)
                top = max(top, eig + damping)
            else:

                def system(x: Tensor, matvec: Callable[[Tensor], Tensor] = matvec) -> Tensor:
                    return precondition(matvec(x) + damping * x)

                eig, direction = _top_eigenvalue(system, curvature, generator, direction)
                top = max(top, eig)
        assert direction is not None  # at least one probe
        # all the data: no minibatch to bound, only the power iteration's tolerance
        margin = self.scale_margin if self.batch_size < curvature.n_total else _FULL_DATA_MARGIN
        return margin * top, direction

    def solve(
        self,
        curvature: CurvatureOperator,
        vectors: Tensor,
        damping: float,
        progress: bool = False,
        factorization: tuple[LowRankInverse, Diagnostics] | None = None,
    ) -> tuple[Tensor, Diagnostics]:
        """Run the recursion on every row of ``vectors`` at once.

        ``factorization``: the preconditioner's factorization when it was already computed
        (for self-influence), so it is computed once per run.
        """
        if not damping > 0:
            raise ValueError(
                f"LiSSA needs `damping > 0` (it is {damping!r}): the recursion converges at a rate "
                "set by `damping`. Pass the model's weight decay or a small positive value such "
                "as 1e-3, or use `Exact()` for an undamped solve of a small model."
            )
        if self.preconditioner is None:
            return self._plain(curvature, vectors, damping, progress)
        if factorization is None:
            factorization = self.preconditioner.factorize(curvature, damping, progress)
        # About nine [rows, p] blocks are alive during the recursion: bound them by the budget.
        itemsize = torch.finfo(curvature.dtype).bits // 8
        rows = max(1, self.max_block_memory // (9 * curvature.n_params * itemsize))
        chunks = [
            _preconditioned(self, curvature, block, damping, progress, *factorization)
            for block in vectors.split(rows)
        ]
        # chunks may take different paths (minibatches or not): every diagnostic any one reports
        keys = dict.fromkeys(k for c in chunks for k in c[1])
        info = {k: max(c[1][k] for c in chunks if k in c[1]) for k in keys}
        return torch.cat([c[0] for c in chunks]), {**info, "chunks": float(len(chunks))}

    def _plain(
        self, curvature: CurvatureOperator, vectors: Tensor, damping: float, progress: bool
    ) -> tuple[Tensor, Diagnostics]:
        """Koh & Liang's recursion, averaged over the last iterates."""
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
            beta, step = float(self.momentum or 0.0), 1.0 + float(self.momentum or 0.0)
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


def _preconditioned(
    lissa: LiSSA,
    curvature: CurvatureOperator,
    vectors: Tensor,
    damping: float,
    progress: bool,
    inverse: LowRankInverse,
    factor_info: Diagnostics,
) -> tuple[Tensor, Diagnostics]:
    """The preconditioned recursion with momentum, window averages and residual checks on
    minibatches; preconditioned conjugate gradients once all the data is used."""
    evecs, evals = inverse.evecs, inverse.evals
    full_rank = evecs.shape[0] >= curvature.n_params
    floor = float(evals[-1]) + damping  # P^-1 on the rest of the space is 1 / floor

    def precondition(x: Tensor) -> Tensor:
        """``P^-1 x``, with one new ``[rows, p]`` block."""
        coords = x @ evecs.T
        if full_rank:
            return (coords / (evals + damping)) @ evecs
        rest = torch.addmm(x, coords, evecs, alpha=-1.0).div_(floor)
        return rest.addmm_(coords / (evals + damping), evecs)

    smallest = float(factor_info.get("most_negative_eigenvalue", 0.0)) + damping
    if smallest <= 0:
        raise ValueError(
            f"H + damping I is not positive definite: the curvature has an eigenvalue near "
            f"{smallest - damping:.3g}, below -damping = {-damping:g}. Pass "
            f"`damping={2 * (damping - smallest):.3g}` or more, or use curvature='gauss_newton', "
            "which is positive semi-definite."
        )
    generator = torch.Generator().manual_seed(lissa.seed)
    top_direction: Tensor | None = None  # the last power iteration's, to start the next one from
    tuning: Diagnostics = {}  # the minibatches' scale, condition number and momentum

    def tuned(batch_size: int) -> tuple[float, float, float, float]:
        """``scale``, the condition number, the momentum and the step for this batch size."""
        nonlocal top_direction
        scale = lissa.scale
        if scale is None:
            probe = replace(lissa, batch_size=batch_size)
            scale, top_direction = probe._scale_and_direction(
                curvature, damping, generator, precondition, top_direction
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
    while float(rel.max()) > lissa.tol and steps < depth and batch_size < n_total:
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
        if float(new_rel.max()) < float(rel.max()):
            x, r, rel = new_x, new_r, new_rel
    # All the data: the system is deterministic, and conjugate gradients need neither a scale
    # nor momentum; their recurred residual is checked against a full one at the end.
    while float(rel.max()) > lissa.tol and steps < depth:
        x, cg_rel, n = conjugate_gradients(
            curvature, damping, x, r, target, lissa.tol, depth - steps, bar, precondition, "LiSSA"
        )
        steps, cg_steps = steps + n, cg_steps + n
        check_finite(x, "LiSSA", damping, None)
        r, rel = residual(x)
        checks += 1
        if n == 0 or float(rel.max()) > 2 * max(float(cg_rel.max()), lissa.tol):
            break  # no progress, or rounding holds the true residual above the recurred one
    bar.close()
    if float(rel.max()) > lissa.tol:
        warnings.warn(
            f"LiSSA stopped after {steps} steps with a relative residual of "
            f"{float(rel.max()):.2g}, above `tol={lissa.tol:g}`. Raise `depth`, raise `damping`, "
            "or raise the preconditioner's `max_memory` (its rank sets the condition number).",
            stacklevel=3,
        )
    info: Diagnostics = {
        **tuning,
        "steps": float(steps),
        "conjugate_gradient_steps": float(cg_steps),
        "residual_checks": float(checks),
        "relative_residual": float(rel.max()),
        "final_batch_size": float(batch_size),
        **{f"preconditioner_{k}": val for k, val in factor_info.items()},
    }
    return x, info


_FULL_DATA_MARGIN = 1.1


def _top_eigenvalue(
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


def auto_depth(scale: float, damping: float, min_depth: int = 100, max_depth: int = 5000) -> int:
    """Recursion depth for the plain series: three times the condition number ``scale / damping``.

    The slowest direction contracts by ``1 - damping / scale`` per step; the last half of the
    steps is averaged.
    """
    kappa = scale / max(damping, 1e-12)
    return int(min(max(math.ceil(3 * kappa), min_depth), max_depth))
