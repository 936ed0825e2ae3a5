"""The operators that pass between core and the solvers, as protocols both sides use.

Solvers consume a :class:`CurvatureOperator` (products, nothing else) and factorized solvers
return an :class:`InverseOperator`; the scoring pass takes a faster route for an
:class:`EigenInverse` (a few eigenvectors and the damping elsewhere). Core implements the first
(:class:`~lightning_influence.Curvature`), the solvers the others; neither imports the other's
modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["CurvatureOperator", "EigenInverse", "InverseOperator", "Probe"]


class Probe(Protocol):
    """The scores of a fixed set of training examples (drawn by dataset index, the same on every
    process), which a solver watches to stop once the answer has converged
    (:class:`~lightning_influence.core.probe.ScoreProbe`)."""

    indices: Tensor

    def __call__(self, vectors: Tensor) -> Tensor:
        """Scores ``-g_i . v``, ``[examples, rows]``, the same on every process."""
        ...

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process."""
        ...

    def epoch_seconds(self) -> float:
        """Seconds of one training epoch (a forward and backward pass over the data)."""
        ...


class CurvatureOperator(Protocol):
    """What a solver may ask of the curvature of the mean training loss: products, nothing else.

    Solvers never see datasets or the model. :class:`~lightning_influence.Curvature` is the
    implementation; a test can pass any object with these members (a dense matrix, say).
    """

    @property
    def n_params(self) -> int:
        """Dimension ``p`` of the parameter space."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """Working precision of the products."""
        ...

    @property
    def device(self) -> torch.device:
        """Device of the products."""
        ...

    @property
    def positive_semidefinite(self) -> bool:
        """True for the Gauss-Newton matrix; False for the Hessian, which may be indefinite."""
        ...

    @property
    def n_total(self) -> int:
        """Training examples the curvature averages over (summed over processes)."""
        ...

    @property
    def output_trace_kept(self) -> float | None:
        """Share of the output Hessians' trace kept by truncated Gauss-Newton products so far."""
        ...

    @property
    def output_trace_uniform(self) -> float | None:
        """The share the kept directions would carry if all output directions weighed the same."""
        ...

    def matvec(self, vectors: Tensor) -> Tensor:
        """Curvature on all training data applied to each row of ``vectors`` ``[m, p]``."""
        ...

    def minibatch(self, batch_size: int, generator: torch.Generator) -> Callable[[Tensor], Tensor]:
        """Products with the curvature of one random minibatch (pooled over processes)."""
        ...

    def subsample(
        self, max_examples: int | None, output_directions: int | None, generator: torch.Generator
    ) -> CurvatureOperator:
        """A cheaper estimate: at most ``max_examples`` examples (in all, on any number of
        processes), and for the Gauss-Newton matrix only the top ``output_directions``
        output-Hessian directions."""
        ...

    def dense(self) -> Tensor:
        """The whole ``[p, p]`` matrix (small models only)."""
        ...

    def probe(self, count: int, seed: int) -> Probe:
        """Scores of ``count`` training examples drawn by dataset index with ``seed``."""
        ...


class InverseOperator(Protocol):
    """``(H + damping I)^-1`` as an operator on blocks of vectors ``[m, p]``."""

    def __call__(self, vectors: Tensor) -> Tensor:
        """The inverse applied to each row."""
        ...

    def quadratic(self, vectors: Tensor) -> Tensor:
        """``v^T (H + damping I)^-1 v`` for each row ``v`` (self-influence), ``[m]``."""
        ...


@runtime_checkable
class EigenInverse(Protocol):
    """An inverse from eigenvectors ``U`` (rows ``[rank, p]``) and ``1 / damping`` on the rest of
    the space, whose quadratic form needs only each vector's squared norm and ``U v``: the
    scoring pass then takes those from layer-wise dot products
    (:class:`~lightning_influence.solvers.LowRankInverse` implements it).

    Example:
        >>> class Half:  # (2 I)^-1: no eigenvectors, damping 2 on the rest
        ...     evecs, explicit_rest = torch.zeros(0, 3), False
        ...     def __call__(self, v): return v / 2
        ...     def quadratic(self, v): return v.square().sum(1) / 2
        ...     def quadratic_from(self, norms, coords): return norms / 2
        >>> isinstance(Half(), EigenInverse), isinstance(torch.eye(2), EigenInverse)
        (True, False)
    """

    evecs: Tensor
    explicit_rest: bool

    def __call__(self, vectors: Tensor) -> Tensor:
        """The inverse applied to each row."""
        ...

    def quadratic(self, vectors: Tensor) -> Tensor:
        """``v^T (H + damping I)^-1 v`` for each row ``v``, ``[m]``."""
        ...

    def quadratic_from(self, squared_norms: Tensor, coords: Tensor) -> Tensor:
        """The quadratic form from each row's squared norm and its coordinates ``U v`` (valid
        unless ``explicit_rest``)."""
        ...
