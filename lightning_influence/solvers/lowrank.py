"""A low-rank inverse of the damped curvature, built from curvature products.

``LowRank`` finds the top ``rank`` eigenpairs ``(e_k, u_k)`` of the curvature from products with
:meth:`Curvature.matvec <lightning_influence.Curvature.matvec>` (a randomized Nystrom
approximation from one block of products, or Lanczos with full reorthogonalisation and its
block variant), then applies

``(H + damping I)^-1 v ~= v / damping + sum_k (1 / (e_k + damping) - 1 / damping) (u_k . v) u_k``:

exact on the span of the eigenvectors it kept, ``1 / damping`` on the rest of the space. Once
built, the inverse costs two ``[m, p] x [p, rank]`` products for a block of ``m`` vectors, which is
what makes self-influence of every training example affordable. Memory holds ``rank + oversample``
vectors of length ``p``, never ``n_train x p``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_influence.solvers.base import (
    CurvatureOperator,
    Diagnostics,
    FactorizedSolver,
)
from lightning_influence.solvers.sketch import NystromSketch, bytes_per_vector, lanczos
from lightning_influence.validation import check_positive_int

__all__ = ["LowRank", "LowRankInverse"]


class LowRankInverse:
    """``(H + damping I)^-1`` from the top eigenpairs ``(e_k, u_k)`` of ``H`` (``U`` holds the
    ``u_k`` as rows): ``U^T diag(1 / (e + damping)) U v`` on their span, ``1 / damping`` on the
    rest of the space.

    Calling it applies the inverse to a block ``[m, p]``; :meth:`quadratic` gives
    ``v^T (H + damping I)^-1 v`` per row (self-influence without forming the ``[m, p]`` result).
    When the kept eigenvectors fill most of the space, the part of ``v`` outside their span is
    formed explicitly instead of as a difference of norms, which would cancel in float32.

    Example:
        >>> import torch
        >>> inverse = LowRankInverse(torch.eye(3)[:1], torch.tensor([1.0]), damping=1.0)
        >>> inverse(torch.ones(1, 3))
        tensor([[0.5000, 1.0000, 1.0000]])
        >>> inverse.quadratic(torch.ones(1, 3))
        tensor([2.5000])
    """

    def __init__(self, evecs: Tensor, evals: Tensor, damping: float) -> None:
        self.evecs, self.evals, self.damping = evecs, evals, damping
        self.weights = (1.0 / (evals + damping) - 1.0 / damping).to(evecs.dtype)
        # Most of the space kept: the rest is formed explicitly (a difference of norms cancels).
        self.explicit_rest = 2 * evecs.shape[0] >= evecs.shape[1]

    @property
    def rank(self) -> int:
        """Number of kept eigenpairs."""
        return int(self.evecs.shape[0])

    def __call__(self, vectors: Tensor) -> Tensor:
        v = vectors.to(dtype=self.evecs.dtype, device=self.evecs.device)
        coords = v @ self.evecs.T
        if self.explicit_rest:
            rest = v - coords @ self.evecs
            return rest / self.damping + (coords / (self.evals + self.damping)) @ self.evecs
        return v / self.damping + (coords * self.weights) @ self.evecs

    def quadratic(self, vectors: Tensor) -> Tensor:
        """``v^T (H + damping I)^-1 v`` for each row ``v`` of ``vectors``."""
        v = vectors.to(dtype=self.evecs.dtype, device=self.evecs.device)
        coords = v @ self.evecs.T
        if self.explicit_rest:
            rest = torch.linalg.vector_norm(v - coords @ self.evecs, dim=1).square()
            return rest / self.damping + coords.square() @ (1.0 / (self.evals + self.damping))
        return self.quadratic_from(torch.linalg.vector_norm(v, dim=1).square(), coords)

    def quadratic_from(self, squared_norms: Tensor, coords: Tensor) -> Tensor:
        """:meth:`quadratic` from each row's squared norm and its coordinates ``U v`` (when the
        rest is not formed explicitly, see ``explicit_rest``)."""
        return squared_norms / self.damping + coords.square() @ self.weights.to(coords.dtype)


@dataclass(frozen=True)
class LowRank(FactorizedSolver):
    """Top-``rank`` eigenpairs of the curvature from curvature products; ``1 / damping`` elsewhere.

    Two methods build the eigenpairs from ``rank + oversample`` curvature-vector products (at
    most the parameter count):

    - ``"nystrom"``: the randomized Nystrom approximation ``Y (Omega^T Y)^+ Y^T`` with
      ``Y = H Omega`` for a random orthonormal block ``Omega``: all products in one pass over
      the data. Needs a positive semi-definite curvature (Gauss-Newton).
    - ``"lanczos"``: Lanczos with full reorthogonalisation (twice-classical Gram-Schmidt against
      every earlier vector) and the Rayleigh-Ritz eigenpairs of the Krylov space; one pass per
      product, or per block of ``block_size`` products (block Lanczos). Works for the
      indefinite Hessian too, and with ``rank`` equal to the parameter count it equals
      :class:`~lightning_influence.Exact`.

    ``"auto"`` (default) takes Nystrom for the Gauss-Newton curvature and block Lanczos in two
    passes (blocks of half the products) for the Hessian. Eigenpairs are kept by largest
    eigenvalue. Self-influence ``g^T (H + damping I)^-1 g`` is
    dominated by ``|g|^2 / damping`` plus a correction along the top eigenvectors, so a small
    rank suffices for rankings (see the self-influence page of the docs for the measurements
    behind the defaults).

    Args:
        rank: eigenpairs kept, at most the number of chosen parameters; ``"auto"`` doubles the
            sketch (32, 64, 128, ... products, keeping the top half; at most a quarter of the
            parameters above 512 of them) until the smallest kept eigenvalue is at most
            ``max_condition`` times the damping, all parameters are kept, or ``max_memory`` is
            reached (with a warning). The diagnostics say which one stopped it.
        oversample: extra products beyond ``rank`` (sharpen the kept eigenpairs).
        max_condition: the condition number left beyond the kept eigenvectors that ``"auto"``
            aims for, ``(e_rank + damping) / damping``. 50 suits a preconditioner and
            self-influence rankings; as an inverse on its own, where the rest of the space is
            inverted as ``1 / damping``, accurate scores need it near 1 (e.g. 2).
        max_memory: bytes the factorization may hold with ``rank="auto"``: the sketch's test
            vectors and eigenvectors, its products in float64, and the copies made while it
            grows, about ``4 itemsize + 16`` bytes per parameter and sketch vector (twice the
            rank kept; :func:`~lightning_influence.solvers.sketch.bytes_per_vector`). The
            curvature products' own working memory comes on top. 1 GiB keeps rank 75 of a
            222k-parameter float32 model.
        method: ``"auto"``, ``"nystrom"`` or ``"lanczos"``.
        block_size: products per pass over the data; by default all of them for ``"nystrom"``,
            1 (plain Lanczos) for ``"lanczos"``, half of them for ``"auto"`` on the Hessian.
        max_examples: estimate the curvature on a random subset of this many training examples
            (all of them when ``None``), drawn with ``seed`` by dataset index: the same examples
            on any number of processes and nodes, each computing the part it holds.
        output_directions: for the Gauss-Newton matrix, keep the top ``output_directions``
            eigenvectors of each example's output Hessian (one backward pass each, instead of
            one per model output); ``None`` is exact. One suffices for a softmax classifier;
            a warning says when the kept directions carry under 1.5 times the share they would
            if all output directions weighed the same (a regressor with several outputs, whose
            output Hessian is isotropic, say). Ignored for the Hessian.
        seed: seeds the random vectors and the subset.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence.core.data import as_indexed
        >>> from lightning_influence.core.curvature import Curvature
        >>> from lightning_influence.core.model import FunctionalModel
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> data = as_indexed(TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,))))
        >>> inverse, info = LowRank(rank=5).factorize(Curvature(fm, data), damping=0.1)
        >>> exact, _ = LowRank(rank=15, method="lanczos").factorize(Curvature(fm, data), 0.1)
        >>> inverse(torch.randn(7, 15)).shape, info["rank"]
        (torch.Size([7, 15]), 5.0)
    """

    rank: int | Literal["auto"] = "auto"
    oversample: int = 4
    max_condition: float = 50.0
    max_memory: int = 2**30
    method: Literal["auto", "nystrom", "lanczos"] = "auto"
    block_size: int | None = None
    max_examples: int | None = 256
    output_directions: int | None = 1
    seed: int = 0
    name = "lowrank"

    def __post_init__(self) -> None:
        if self.method not in ("auto", "nystrom", "lanczos"):
            raise ValueError(
                f"`method` must be 'auto', 'nystrom' or 'lanczos', got {self.method!r}."
            )
        if self.rank != "auto":
            check_positive_int("rank", self.rank)
        if not self.max_condition > 1:
            raise ValueError(f"`max_condition` must be above 1, got {self.max_condition!r}.")
        check_positive_int("max_memory", self.max_memory)
        check_positive_int("block_size", self.block_size, allow_none=True)
        if not isinstance(self.oversample, int) or self.oversample < 0:
            raise ValueError(
                f"`oversample` must be a non-negative integer, got {self.oversample!r}."
            )
        check_positive_int("output_directions", self.output_directions, allow_none=True)
        check_positive_int("max_examples", self.max_examples, allow_none=True)

    def factorize(
        self, curvature: CurvatureOperator, damping: float, progress: bool = False
    ) -> tuple[LowRankInverse, Diagnostics]:
        """Find the top eigenpairs and return the low-rank-plus-damping inverse."""
        p = curvature.n_params
        if self.rank != "auto" and self.rank > p:
            raise ValueError(
                f"`rank={self.rank}` exceeds the number of chosen parameters ({p}). Use "
                f"`LowRank(rank={p})` or less (rank {p} is exact), or `Exact()` for a model "
                "this small."
            )
        if not damping > 0:
            raise ValueError(
                f"LowRank needs `damping > 0` (it is {damping:g}): the directions it does not keep "
                "are inverted as 1 / damping. Pass the model's weight decay, or a small positive "
                "value such as 1e-3."
            )
        generator = torch.Generator().manual_seed(self.seed)
        # Its own generator: the subset's draw leaves the sketch's random blocks as they are.
        subset_generator = torch.Generator().manual_seed(self.seed + 1)
        curv = curvature.subsample(self.max_examples, self.output_directions, subset_generator)
        itemsize = torch.finfo(curv.dtype).bits // 8
        # the sketch's vectors that fit in `max_memory` with everything it holds beside them
        budget = max(2, self.max_memory // bytes_per_vector(p, itemsize))
        size_cap = size_limit(p)
        if self.rank == "auto":
            dim, stop = min(p, 32, budget), ""
        else:
            dim, stop = min(p, self.rank + self.oversample), "rank"
        n_products = n_passes = 0
        # Nystrom products are kept: a larger sketch costs only its new products.
        sketch = NystromSketch(curv, generator) if self._method(curv) == "nystrom" else None
        while True:
            evals, evecs, most_negative, products, passes = self._eigenpairs(
                curv, dim, generator, progress, sketch
            )
            n_products, n_passes = n_products + products, n_passes + passes
            keep = dim if dim == p else max(1, dim // 2)  # the top half is accurate
            if stop == "rank":
                keep = min(int(self.rank), dim)
                break
            if float(evals[keep - 1]) <= self.max_condition * damping:
                stop = "condition"
            elif dim >= p:
                stop = "full rank"
            elif dim >= budget:
                stop = "memory"
            elif dim >= size_cap:
                stop = "size"
            if stop:
                break
            dim = min(p, 2 * dim, budget, size_cap)
        if evecs is None:  # a sketch's eigenvectors: one pass over the parameters, at the end
            assert sketch is not None
            evals, evecs = _descending(*sketch.eigenpairs())
        evals, evecs = evals[:keep], evecs[:keep]
        if not curvature.positive_semidefinite and dim < p:  # an incomplete sketch
            # The sketch resolves the top of the spectrum; single-vector Lanczos on all the data
            # finds the bottom end (Ritz values lie inside the spectrum: never too negative).
            low, _, more, more_passes = lanczos(
                curvature, min(p, _BOTTOM_LANCZOS_STEPS), 1, generator, False
            )
            most_negative = min(most_negative, float(low.min()))
            n_products, n_passes = n_products + more, n_passes + more_passes
        shifted = evals + damping
        if bool((shifted.abs() <= 1e-12 * shifted.abs().max()).any()):
            raise ValueError(
                "H + damping I is singular on the kept eigenvectors (eigenvalue "
                f"{float(evals[shifted.abs().argmin()]):.3g}, damping {damping:g}); increase "
                "`damping` or use curvature='gauss_newton', which is positive semi-definite."
            )
        inverse = LowRankInverse(evecs.contiguous(), evals, damping)
        info: Diagnostics = {
            "rank": float(keep),
            "max_eigenvalue": float(evals[0]),
            "min_eigenvalue": float(evals[-1]),
            "most_negative_eigenvalue": most_negative,
            "negative_eigenvalues": float((shifted < 0).sum()),
            "condition_beyond_rank": float((evals[-1] + damping) / damping),
            "rank_limited_by_memory": float(stop == "memory"),
            "rank_limited_by_size": float(stop == "size"),
            "matvecs": float(n_products),
            "curvature_passes": float(n_passes),
            "examples": float(curv.n_total),
        }
        if stop == "memory":
            warnings.warn(
                f"LowRank stopped at rank {keep}, the most that `max_memory={self.max_memory}` "
                f"bytes holds, where the curvature beyond the kept eigenvectors still spans "
                f"{float(evals[-1]) / damping:.3g} times the damping (the target is "
                f"`max_condition={self.max_condition:g}`). Raise `max_memory`, raise `damping`, "
                "or restrict influence with `parameters=`.",
                stacklevel=2,
            )
        kept = curv.output_trace_kept
        if kept is not None:
            info["output_directions"] = float(self.output_directions or 0)
            info["output_trace_kept"] = kept
            uniform = curv.output_trace_uniform or 0.0
            if kept < _LOW_TRACE_GAIN * uniform:  # barely better than keeping any direction
                warnings.warn(
                    f"LowRank kept {kept:.0%} of the output Hessians' trace with "
                    f"`output_directions={self.output_directions}`, so its Gauss-Newton matrix "
                    "is a rough one and its scores may be far off. Pass a larger "
                    "`output_directions`, or None for the exact matrix (one backward pass per "
                    "model output).",
                    stacklevel=2,
                )
        return inverse, info

    def _method(self, curv: CurvatureOperator) -> str:
        """``"nystrom"`` or ``"lanczos"``; ``"auto"`` takes Nystrom for a semi-definite one."""
        if self.method != "auto":
            return self.method
        return "nystrom" if curv.positive_semidefinite else "lanczos"

    def _eigenpairs(
        self,
        curv: CurvatureOperator,
        dim: int,
        generator: torch.Generator,
        progress: bool,
        sketch: NystromSketch | None,
    ) -> tuple[Tensor, Tensor | None, float, int, int]:
        """Eigenvalues from ``dim`` products, largest first, with their eigenvectors from
        Lanczos (``None`` from a Nystrom ``sketch``, which reuses its products and gives its
        eigenvectors apart); the most negative eigenvalue found, the new products and the
        passes over the data."""
        if sketch is not None:
            products, passes = sketch.grow(dim, self.block_size or dim, progress)
            evals = sketch.eigenvalues().flip(0)
            return evals, None, min(0.0, float(evals.min())), products, passes
        # plain Lanczos, or for "auto" block Lanczos in two passes
        block_size = self.block_size or (-(-dim // 2) if self.method == "auto" else 1)
        evals, evecs, products, passes = lanczos(curv, dim, block_size, generator, progress)
        evals, evecs = _descending(evals, evecs)
        return evals, evecs, min(0.0, float(evals.min())), products, passes


def _descending(evals: Tensor, evecs: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs sorted by eigenvalue, largest first."""
    order = torch.argsort(evals, descending=True)
    return evals[order], evecs[order]


def size_limit(p: int) -> int:
    """The most vectors an automatic sketch takes for ``p`` parameters: a sketch of more than a
    quarter of them costs about what the dense matrix does; small models may go to full rank.

    Example:
        >>> size_limit(400), size_limit(10_000)
        (400, 2500)
    """
    return p if p <= 512 else max(32, p // 4)


_LOW_TRACE_GAIN = 1.5
_BOTTOM_LANCZOS_STEPS = 40
