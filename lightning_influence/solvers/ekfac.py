"""``EKFAC``: Kronecker-factored curvature per layer with corrected eigenvalues, inverted exactly.

Each layer's Gauss-Newton block is approximated in the eigenbasis ``Q_A (x) Q_G`` of its
Kronecker factors, with the eigenvalues replaced by the block's exact diagonal in that basis
(:mod:`lightning_influence.core.kronecker`); the inverse is then
``(Q_A (x) Q_G) diag(1 / (L + damping)) (Q_A (x) Q_G)^T``, block by block. It costs two passes
over the training data and one eigendecomposition per factor, whatever the number of vectors it
is applied to: an approximate answer at a fixed cost. Cross-layer curvature is left out, so it
ranks like the exact inverse without equalling it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_influence.core.kronecker import OutputDirections, kronecker_factors
from lightning_influence.core.kronecker_layers import KroneckerLayer
from lightning_influence.solvers.base import CurvatureOperator, Diagnostics, FactorizedSolver
from lightning_influence.validation import check_positive_int

__all__ = ["EKFAC", "KroneckerInverse"]


class KroneckerInverse:
    """``(H + damping I)^-1`` for a block-diagonal ``H`` whose layer blocks are
    ``(Q_A (x) Q_G) diag(L) (Q_A (x) Q_G)^T``: each row's layer block ``V`` ``[out, in]`` goes to
    ``Q_G ((Q_G^T V Q_A) / (L + damping)) Q_A^T``.

    Example:
        >>> from lightning_influence.core.kronecker_layers import KroneckerLayer
        >>> layer = KroneckerLayer("fc", slice(0, 2), None, n_out=1, n_in=2, a_basis=torch.eye(2),
        ...                        g_basis=torch.eye(1), eigenvalues=torch.tensor([[1.0, 3.0]]))
        >>> inverse = KroneckerInverse([layer], damping=1.0)
        >>> inverse(torch.ones(1, 2)), inverse.quadratic(torch.ones(1, 2))
        (tensor([[0.5000, 0.2500]]), tensor([0.7500]))
    """

    def __init__(self, layers: list[KroneckerLayer], damping: float) -> None:
        self.layers, self.damping = layers, damping
        self._weights = [1.0 / (layer.eigenvalues + damping) for layer in layers]

    def _rotated(self, layer: KroneckerLayer, vectors: Tensor) -> Tensor:
        v = vectors.to(dtype=layer.a_basis.dtype, device=layer.a_basis.device)
        return layer.g_basis.T @ layer.blocks(v) @ layer.a_basis  # [m, out, in_ext]

    def __call__(self, vectors: Tensor) -> Tensor:
        """The inverse applied to each row of ``vectors`` ``[m, p]``."""
        dtype = self.layers[0].a_basis.dtype
        out = torch.empty(vectors.shape, dtype=dtype, device=self.layers[0].a_basis.device)
        for layer, weights in zip(self.layers, self._weights, strict=True):
            scaled = self._rotated(layer, vectors) * weights
            layer.place(layer.g_basis @ scaled @ layer.a_basis.T, out)
        return out.to(vectors.dtype)

    def quadratic(self, vectors: Tensor) -> Tensor:
        """``v^T (H + damping I)^-1 v`` for each row ``v`` of ``vectors``."""
        total = torch.zeros(vectors.shape[0], dtype=self.layers[0].a_basis.dtype)
        total = total.to(self.layers[0].a_basis.device)
        for layer, weights in zip(self.layers, self._weights, strict=True):
            total += (self._rotated(layer, vectors).square() * weights).sum(dim=(1, 2))
        return total.to(vectors.dtype)


@dataclass(frozen=True)
class EKFAC(FactorizedSolver):
    """Eigenvalue-corrected Kronecker-factored Gauss-Newton (George et al. 2018), inverted exactly.

    Per layer (``nn.Linear``, or a linear layer with its weight stored ``[in, out]`` such as
    GPT-2's ``Conv1D``): the factors ``A = E[a a^T]`` of its inputs (with a 1 for the bias) and
    ``G = E[g g^T]`` of its output gradients, taken along the eigen-directions of each example's
    loss Hessian with respect to the model outputs (so ``G`` is of the Gauss-Newton matrix
    itself, not a sampled estimate); their eigenbases; and, from a second pass, the exact diagonal
    of the layer's Gauss-Newton block in that basis as eigenvalues. Sequences sum ``g_t a_t^T``
    over positions. Any number of vectors, and self-influence, reuse the factors.

    Every chosen parameter must belong to such a layer (an ``InfluenceError`` lists the others and
    the ``parameters=`` that leaves them out): a damping-only stand-in for them would weigh their
    share of every score by ``1 / damping`` and quietly dominate the rankings.

    Args:
        samples: ``None`` (default) runs one backward pass per eigen-direction of each
            example's output Hessian (9 for a 10-class softmax): the factors are of the
            Gauss-Newton matrix itself and the corrected eigenvalues exact. An integer runs that
            many passes along random sign combinations of those directions instead, equal to it
            in expectation (like labels sampled from the model): cheaper for wide layers, whose
            factors cost ``passes x out^2`` per example.
        seed: seeds the random signs.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence.core.data import as_indexed
        >>> from lightning_influence.core.curvature import Curvature
        >>> from lightning_influence.core.model import FunctionalModel
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> data = as_indexed(TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,))))
        >>> inverse, info = EKFAC().factorize(Curvature(fm, data), damping=0.1)
        >>> inverse(torch.randn(7, 15)).shape, info["layers"]
        (torch.Size([7, 15]), 1.0)
    """

    samples: int | None = None
    seed: int = 0
    name = "ekfac"

    def __post_init__(self) -> None:
        check_positive_int("samples", self.samples, allow_none=True)

    def factorize(
        self, curvature: CurvatureOperator, damping: float, progress: bool = False
    ) -> tuple[KroneckerInverse, Diagnostics]:
        """Two passes over the training data behind ``curvature``; the inverse of the factors."""
        if not damping > 0:
            from lightning_influence.errors import InfluenceError  # errors imports the solvers

            raise InfluenceError(
                f"EKFAC needs `damping > 0` (it is {damping:g}): directions that no example's "
                "gradient reaches have eigenvalue 0. Pass the model's weight decay, or a small "
                "positive value such as 1e-3."
            )
        layers, factors_info = kronecker_factors(
            curvature, OutputDirections(self.samples, self.seed), progress
        )
        info: Diagnostics = dict(factors_info)
        eigenvalues = torch.cat([layer.eigenvalues.flatten() for layer in layers])
        widest = max(max(layer.n_in_ext, layer.n_out) for layer in layers)
        info.update(
            layers=float(len(layers)),
            max_eigenvalue=float(eigenvalues.max()),
            min_eigenvalue=float(eigenvalues.min()),
            widest_factor=float(widest),
            examples=float(curvature.n_total),
        )
        return KroneckerInverse(layers, damping), info
