"""LiSSA's stopping rule: on the answer (a probe's scores), on the residual, or at a budget.

Users look at scores, and scores converge well before the solved vectors do. At every check the
solver hands its iterate over and the scores of a fixed probe set of training examples are
taken. Their change over the last ``span`` steps, ``A``, and over the ``span`` before, ``B``,
give the contraction per span ``q = A / B`` and an estimate of how far the scores still are from
converged, ``A q / (1 - q)`` (the rest of a geometric series). The solve stops once that
estimate is below ``tol`` for both the values (relative, per validation point) and the ranks
(``1 - Spearman``), with every relative residual below ``tol / 2`` (a stalled solve also moves
its scores little); or once every relative residual is below ``residual_tol``; or at the
budget, keeping the best iterate so far.

The same test holds row by row: a validation row whose own scores are within ``tol`` (and whose
residual is below ``tol / 2``, or below ``residual_tol``) is settled, and conjugate gradients
stop taking products for it while the others go on (:attr:`Stopping.settled`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_influence.core.operators import Probe
from lightning_influence.solvers.base import Diagnostics

__all__ = ["Stopping", "rank_change", "value_change"]

# The contraction per span taken in the estimate is at most this (the estimate stays finite).
_MAX_RATE = 0.9
# Stopping on the scores also needs every relative residual below this share of `tol`.
_RESIDUAL_SHARE = 0.5


def value_change(new: Tensor, old: Tensor) -> Tensor:
    """The relative change of each column of scores: ``|new_j - old_j| / |new_j|``.

    Example:
        >>> value_change(torch.tensor([[2.0], [0.0]]), torch.tensor([[1.5], [0.0]]))
        tensor([0.2500])
    """
    norms = new.norm(dim=0).clamp_min(torch.finfo(new.dtype).tiny)
    return (new - old).norm(dim=0) / norms


def rank_change(new: Tensor, old: Tensor) -> Tensor:
    """``1 - Spearman`` correlation between each column of ``new`` and of ``old``.

    Example:
        >>> new, old = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [3.0], [2.0]])
        >>> rank_change(new, old)
        tensor([0.5000], dtype=torch.float64)
    """
    if new.shape[0] < 2:
        return torch.zeros(new.shape[1], dtype=torch.float64)

    def centred_ranks(t: Tensor) -> Tensor:
        ranks = t.argsort(dim=0).argsort(dim=0).to(torch.float64)
        return ranks - ranks.mean(dim=0)

    a, b = centred_ranks(new), centred_ranks(old)
    norms = (a.norm(dim=0) * b.norm(dim=0)).clamp_min(torch.finfo(torch.float64).tiny)
    return 1 - (a * b).sum(0) / norms


@dataclass
class Stopping:
    """Decides, check by check, when a solve stops, and says why in its diagnostics.

    Args:
        tol: the scores' tolerance (values and ranks); ``None`` stops on the residual alone.
        residual_tol: stop once every relative residual is below this.
        probe: the probe's scores (``None``: the residual alone).
        deadline: ``time.perf_counter()`` at which the budget runs out (``None``: no budget).
        started: when the solve started.
        epoch_seconds: one training epoch's seconds, when known (the diagnostics count epochs).
        span: the steps over which the scores' change is measured.

    Example:
        >>> stop = Stopping(tol=None, residual_tol=1e-3, probe=None)
        >>> stop.check(torch.zeros(1, 2), torch.tensor([0.5]), 1), stop.reason
        (False, '')
        >>> stop.check(torch.zeros(1, 2), torch.tensor([1e-4]), 2), stop.reason
        (True, 'residual')
    """

    tol: float | None
    residual_tol: float
    probe: Probe | None
    deadline: float | None = None
    started: float = field(default_factory=time.perf_counter)
    epoch_seconds: float | None = None
    span: int = 10
    reason: str = ""
    steps: int = 0
    history: list[tuple[int, Tensor]] = field(default_factory=list)
    changes: tuple[float, float] | None = None
    distance: tuple[float, float] = (math.inf, math.inf)
    residual: float = math.inf
    row_distance: Tensor | None = None  # [rows, 2]: each row's estimate (values, ranks)
    settled: Tensor | None = None  # [rows]: rows whose scores are within tol; they stay so

    @property
    def done(self) -> bool:
        """Whether a check has decided to stop."""
        return bool(self.reason)

    @property
    def last_scores(self) -> Tensor | None:
        """The probe's scores at the last check that took them."""
        return self.history[-1][1] if self.history else None

    def _before(self, steps: int) -> int | None:
        """Position in the history of the last check at least ``span`` steps before ``steps``."""
        earlier = [i for i, (done, _) in enumerate(self.history) if done <= steps - self.span]
        return earlier[-1] if earlier else None

    def _measure(self) -> None:
        """The scores' change over the last span and the distance estimate from it; checks
        older than the span before are dropped (no later check needs them)."""
        steps, now = self.history[-1]
        a = self._before(steps)
        b = self._before(self.history[a][0]) if a is not None else None
        if a is None or b is None:
            return
        self.history = self.history[b:]
        (_, then), (_, first) = self.history[a - b], self.history[0]
        moved, before = (now - then).norm(dim=0), (then - first).norm(dim=0)
        rate = (moved / before.clamp_min(torch.finfo(before.dtype).tiny)).clamp_max(_MAX_RATE)
        changes = torch.stack([value_change(now, then), rank_change(now, then)], dim=1)
        self.row_distance = (changes * (rate / (1 - rate))[:, None]).cpu()
        self.changes = float(changes[:, 0].max()), float(changes[:, 1].max())
        values, ranks = self.row_distance.max(dim=0).values.tolist()
        self.distance = values, ranks

    def estimate(self) -> tuple[float, float]:
        """How far the scores still are from converged, values and ranks: their change over the
        last span times ``q / (1 - q)``, ``q`` the contraction from the span before (``inf``
        until two spans were seen)."""
        return self.distance

    def check(self, x: Tensor, relative_residual: Tensor, steps: int, moved: bool = True) -> bool:
        """Record a check of iterate ``x`` (rows) with its relative residuals after ``steps``
        steps (``moved``: whether ``x`` changed since the last check); True once the solve
        should stop."""
        residual = relative_residual.detach().cpu()
        self.steps, self.residual = steps, float(residual.max())
        settled = residual <= self.residual_tol
        if self.probe is not None and self.tol is not None and moved:
            self.history.append((steps, self.probe(x).double()))
            self._measure()
            if self.row_distance is not None:
                # a stalled solve moves its scores little: its residual tells it apart
                near = residual <= self.tol * _RESIDUAL_SHARE
                settled |= (self.row_distance.max(dim=1).values <= self.tol) & near
        self.settled = settled if self.settled is None else self.settled | settled
        if bool(self.settled.all()):
            scores = self.probe is not None and self.tol is not None
            self.reason = "scores" if scores and self.residual > self.residual_tol else "residual"
        if not self.reason and self.deadline is not None:
            over = time.perf_counter() > self.deadline
            if self.probe is not None:
                over = self.probe.any(over)  # every process stops at the same check
            if over:
                self.reason = "budget"
        return self.done

    def reopen(self, relative_residual: Tensor) -> None:
        """Take the true relative residuals measured after a stop on recurred ones: rows above
        ``residual_tol`` that had settled on their residual alone are no longer settled, and a
        stop on the residual is taken back while any row is above."""
        tol = self.residual_tol
        residual = relative_residual.detach().cpu()
        self.residual = float(residual.max())
        if self.reason != "residual" or self.residual <= tol:
            return
        self.reason = ""
        if self.settled is not None:
            on_scores = torch.zeros_like(self.settled)
            if self.row_distance is not None and self.tol is not None:
                on_scores = self.row_distance.max(dim=1).values <= self.tol
            self.settled &= (residual <= tol) | on_scores

    def show(self, bar: tqdm) -> None:
        """The estimate and the residual on the progress bar."""
        values, ranks = self.estimate()
        text = f"residual {self.residual:.1e}"
        if math.isfinite(values):
            text = f"scores ~{values:.1%} from converged (ranks {ranks:.1%}), {text}"
        if self.deadline is not None:
            text += f", budget {max(0.0, self.deadline - time.perf_counter()):.0f} s left"
        bar.set_postfix_str(text, refresh=False)

    def diagnostics(self) -> Diagnostics:
        """Why and where the solve stopped, with the scores' estimate and the residual."""
        values, ranks = self.estimate()
        seconds = time.perf_counter() - self.started
        info: Diagnostics = {
            "relative_residual": self.residual,
            "stopped_on_scores": float(self.reason == "scores"),
            "stopped_by_budget": float(self.reason == "budget"),
            "solve_seconds": seconds,
        }
        if self.probe is not None and self.tol is not None:
            info["probe_examples"] = float(self.probe.indices.numel())
            if self.changes is not None:
                info["score_change"], info["score_rank_change"] = self.changes
            if math.isfinite(values):
                info["score_distance"], info["score_rank_distance"] = values, ranks
        if self.epoch_seconds:
            info["solve_epochs"] = seconds / self.epoch_seconds
        return info

    def warn(self, budget: str) -> None:
        """Warn when the solve stopped before the answer converged: at the budget (described by
        ``budget``) or at the step limit."""
        if self.reason in ("scores", "residual"):
            return
        values, ranks = self.estimate()
        if self.tol is not None and self.probe is not None:
            state = (
                f"the probe's scores changed by {self.changes[0]:.1%} over the last "
                f"{self.span} steps (ranks {self.changes[1]:.1%}), and were still up to "
                f"{values:.1%} from converged by a cautious estimate (ranks {ranks:.1%}; "
                f"`tol={self.tol:g}`)"
                if self.changes is not None and math.isfinite(values)
                else "too few checks were made to estimate how far the scores were from converged"
            )
        else:
            state = (
                f"the relative residual was {self.residual:.2g} "
                f"(`residual_tol={self.residual_tol:g}`)"
            )
        if self.reason == "budget":
            warnings.warn(
                f"LiSSA stopped at its budget ({budget}) after {self.steps} steps with the best "
                f"iterate so far: {state}. Raise the budget for converged scores; the diagnostics "
                "hold the estimate (`solver_score_distance`).",
                stacklevel=4,
            )
        else:
            warnings.warn(
                f"LiSSA stopped after {self.steps} steps: {state}. Raise `depth`, raise `damping`, "
                "or raise the preconditioner's `max_memory` (its rank sets the condition number).",
                stacklevel=4,
            )
