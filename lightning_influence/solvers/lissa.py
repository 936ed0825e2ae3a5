"""``LiSSA``: the stochastic Neumann recursion on minibatch curvature."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
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
from lightning_influence.solvers.lowrank import LowRank, LowRankInverse
from lightning_influence.solvers.preconditioner import PRECONDITIONER
from lightning_influence.solvers.recursion import preconditioned, scale_and_direction
from lightning_influence.solvers.refinement import ProductDType
from lightning_influence.solvers.stopping import Stopping
from lightning_influence.validation import check_positive_int

__all__ = ["DEFAULT_TOL", "PRECONDITIONER", "LiSSA", "auto_depth"]

# The scores' tolerance on their estimated distance to converged (an over-estimate by 2 to 9
# times on the 222k-parameter MLP of the benchmarks, where it stops at Pearson 0.9995 and
# Spearman 0.998 against a tightly converged solve: docs/benchmarks.md).
DEFAULT_TOL = 0.2


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
    residual is measured (at the average of the window's last half) and the next window's steps
    use it as a control variate (no minibatch noise floor). A window that gains less than half
    what the condition number allows doubles the minibatch (noise); once minibatch windows gain,
    or by one minibatch's error along the start direction would gain, less per pass over the
    data than full-data steps, the solve goes on with all the data (small training sets: from
    the start), where the system is deterministic and it finishes with preconditioned
    conjugate gradients (fewer products than heavy ball at the same rate bound, and no scale to
    estimate), each row on its own, checked against a full residual at the end.

    **Stopping on the answer.** At every check the scores of ``probe_examples`` training
    examples (drawn by dataset index, the same on every process) are taken. Their change over
    the last ``check_every`` steps, extrapolated at the rate it shrank from the span before,
    estimates how far they still are from converged; the solve stops once that is below ``tol``
    for the values (relative, per validation point) and the ranks (``1 - Spearman``), or once
    every relative residual is below ``residual_tol``. Scores converge well before the vectors
    do. Each validation point settles on its own and then takes no more products.
    ``budget_seconds`` or ``budget_epochs`` stop it earlier with the best iterate so far, a
    warning and the estimate in the diagnostics (``score_distance``, ``score_rank_distance``,
    ``stopped_by_budget``).

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
            ``l_k <= 5 damping`` within 1 GiB of working memory); ``None`` for plain LiSSA.
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
        tol: preconditioned: stop once the probe's scores are estimated within this of
            converged, values and ranks (see above); ignored without a probe.
        residual_tol: preconditioned: stop once every relative residual
            ``|P^-1 r| / |P^-1 v|`` is below this, whatever the scores; plain: once the
            relative change of the averaged estimate is. ``None``: ``min(3e-3, tol / 10)``.
        probe_examples: training examples whose scores ``tol`` watches; 0 stops on the
            residual alone.
        budget_seconds: stop after this many seconds of the solve (the preconditioner's
            factorization included), with the best iterate so far and a warning.
        budget_epochs: the same budget in training epochs: one forward and backward pass over
            the training data, timed once before the solve.
        average: plain only: fraction of the final iterates averaged (0 keeps the last one).
        seed: seeds the minibatch draws and the power iteration.
        scale_margin: factor on the largest minibatch eigenvalue found (1.1 on all the data).
        probe_batches: minibatches probed for the largest eigenvalue.
        max_depth: the most steps an automatic plain ``depth`` may take.
        check_every: preconditioned: the fewest steps between full-data residual checks.
        max_block_memory: preconditioned: bytes the working copies of the validation block may
            take (about nine ``[rows, p]`` blocks); a larger block is solved in chunks of rows.
        product_dtype: preconditioned, float32 models: the precision of the full-data
            conjugate-gradient products. ``"bfloat16"``: most in bfloat16 (float32 sums), with
            float32 residuals replacing the recurred ones, so the answer is float32's;
            about 2x faster per product where bfloat16 is native, with a fall-back to float32
            when bfloat16 products do not gain (diagnostics: ``bfloat16_products``,
            ``float32_products``, ``residual_replacements``, ``bfloat16_product_error``,
            ``bfloat16_fell_back``). ``"auto"``: bfloat16 on a CUDA device that supports it and
            on CPUs with AVX512-BF16 or AMX, else float32. float64 models stay float64.

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
    tol: float = DEFAULT_TOL
    residual_tol: float | None = None
    probe_examples: int = 64
    budget_seconds: float | None = None
    budget_epochs: float | None = None
    average: float = 0.5
    seed: int = 0
    scale_margin: float = 1.25
    probe_batches: int = 8
    max_depth: int = 5000
    check_every: int = 10
    max_block_memory: int = 2**30
    product_dtype: ProductDType = "auto"
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
        for arg in ("tol", "residual_tol", "budget_seconds", "budget_epochs"):
            value = getattr(self, arg)
            if not (value is None and arg != "tol") and not (
                isinstance(value, int | float) and value > 0
            ):
                raise ValueError(f"`{arg}` must be positive, got {value!r}.")
        if self.product_dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(
                "`product_dtype` must be 'auto', 'bfloat16' or 'float32', got "
                f"{self.product_dtype!r}."
            )
        if not isinstance(self.probe_examples, int) or self.probe_examples < 0:
            raise ValueError(
                f"`probe_examples` must be a non-negative integer, got {self.probe_examples!r}."
            )

    @property
    def residual_limit(self) -> float:
        """``residual_tol``, or ``min(3e-3, tol / 10)`` when it is ``None``."""
        return self.residual_tol if self.residual_tol is not None else min(3e-3, self.tol / 10)

    def budget_text(self) -> str:
        """The budget as the user stated it (empty without one)."""
        parts = [f"budget_seconds={self.budget_seconds:g}"] if self.budget_seconds else []
        parts += [f"budget_epochs={self.budget_epochs:g}"] if self.budget_epochs else []
        return ", ".join(f"`{p}`" for p in parts)

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
        return scale_and_direction(
            self, curvature, damping, generator, self.batch_size, precondition
        )[0]

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
        probe = None
        if self.probe_examples and hasattr(curvature, "probe"):  # a test's operator may lack it
            probe = curvature.probe(self.probe_examples, self.seed)
        epoch = probe.epoch_seconds() if probe is not None and self.budget_epochs else None
        started = time.perf_counter()
        budgets = [self.budget_seconds, epoch and self.budget_epochs and epoch * self.budget_epochs]
        deadline = min((started + b for b in budgets if b), default=None)
        if factorization is None:
            factorization = self.preconditioner.factorize(curvature, damping, progress)
        # About nine [rows, p] blocks are alive during the recursion: bound them by the budget.
        itemsize = torch.finfo(curvature.dtype).bits // 8
        rows = max(1, self.max_block_memory // (9 * curvature.n_params * itemsize))
        chunks = []
        for block in vectors.split(rows):
            stop = Stopping(
                self.tol, self.residual_limit, probe, deadline, started, epoch, self.check_every
            )
            chunks.append(
                preconditioned(self, curvature, block, damping, progress, *factorization, stop)
            )
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
                        if rel < self.residual_limit:
                            break
                    last = current
            total += avg / n_avg if n_avg else h
        bar.close()
        result = total / (self.repeats * scale)
        check_finite(result, "LiSSA", damping, scale)
        info = {"scale": scale, "depth": float(depth), "steps": float(steps)}
        return result, {**info, "relative_change": rel, "momentum": beta}


def auto_depth(scale: float, damping: float, min_depth: int = 100, max_depth: int = 5000) -> int:
    """Recursion depth for the plain series: three times the condition number ``scale / damping``.

    The slowest direction contracts by ``1 - damping / scale`` per step; the last half of the
    steps is averaged.
    """
    kappa = scale / max(damping, 1e-12)
    return int(min(max(math.ceil(3 * kappa), min_depth), max_depth))
