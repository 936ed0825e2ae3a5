"""Eigenpairs of a curvature from its products: a randomized Nystrom sketch that grows in place,
and block Lanczos.

Eigenvalues come as ``[dim]`` and eigenvectors as rows ``[dim, p]``, with the number of
curvature-vector products and the number of passes over the data they took.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_influence.solvers.base import CurvatureOperator

__all__ = ["NystromSketch", "bytes_per_vector", "column_chunks", "lanczos"]


def lanczos(
    curvature: CurvatureOperator,
    dim: int,
    block_size: int,
    generator: torch.Generator,
    progress: bool,
) -> tuple[Tensor, Tensor, int, int]:
    """Ritz pairs of the curvature on a ``dim``-dimensional Krylov space.

    Returns eigenvalues ``[dim]``, eigenvectors as rows ``[dim, p]``, the number of
    curvature-vector products and the number of passes over the data.
    """
    p = curvature.n_params
    dtype, device = curvature.dtype, curvature.device
    basis = torch.zeros(dim, p, dtype=dtype, device=device)
    proj = torch.zeros(dim, dim, dtype=torch.float64)
    filled = 0
    start = _random(min(block_size, dim), p, generator, dtype, device)
    block = _orthonormal(start, basis[:0], generator)
    passes = 0
    bar = tqdm(total=dim, desc="Lanczos", disable=not progress, leave=False)
    while filled < dim:
        width = block.shape[0]
        basis[filled : filled + width] = block
        image = curvature.matvec(block)
        passes += 1
        # Column block of the Rayleigh quotient Q A Q^T, rows 0..filled+width.
        proj[: filled + width, filled : filled + width] = (
            basis[: filled + width] @ image.T
        ).double()
        filled += width
        bar.update(width)
        if filled < dim:
            block = _orthonormal(image[: dim - filled], basis[:filled], generator)
    bar.close()
    upper = torch.triu(proj)
    sym = upper + upper.T - torch.diag(torch.diagonal(proj))
    evals, vecs = torch.linalg.eigh(sym)
    evecs = vecs.T.to(dtype=dtype, device=device) @ basis
    return evals.to(dtype), evecs, dim, passes


class NystromSketch:
    """Products ``Y = H Omega`` with an orthonormal test block ``Omega``, grown in place: a
    larger sketch reuses every product already taken (the test block gains rows orthonormal to
    the old ones), so doubling the sketch costs only the new products.

    Eigenpairs in the stable form of Tropp et al. (2017): shift ``Y`` by ``nu * Omega`` with a
    tiny ``nu``, take a Cholesky factor ``C`` of ``Omega^T Y_nu`` and the SVD of ``C^-1 Y_nu``
    (from its Gram matrix); eigenvalues are the squared singular values minus ``nu``. The small
    Gram matrices ``Y Y^T`` and ``Omega Y^T`` grow with the sketch (only the new rows' inner
    products are taken), so the eigenvalues of a grown sketch cost no pass over the parameters;
    the eigenvectors take one.

    Example:
        >>> import torch
        >>> from lightning_influence.core.curvature import Curvature
        >>> from lightning_influence.core.data import as_indexed
        >>> from lightning_influence.core.model import FunctionalModel
        >>> from lightning_influence.core.task import ClassificationTask
        >>> from torch.utils.data import TensorDataset
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> data = as_indexed(TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,))))
        >>> sketch = NystromSketch(Curvature(fm, data), torch.Generator().manual_seed(0))
        >>> sketch.grow(5, block_size=5, progress=False), sketch.grow(10, 10, False)
        ((5, 1), (5, 1))
        >>> sketch.eigenvalues().shape, sketch.eigenpairs()[1].shape
        (torch.Size([10]), torch.Size([10, 15]))
    """

    def __init__(self, curvature: CurvatureOperator, generator: torch.Generator) -> None:
        self.curvature, self.generator = curvature, generator
        p, dtype, device = curvature.n_params, curvature.dtype, curvature.device
        self.omega = torch.zeros(0, p, dtype=dtype, device=device)
        self.images = torch.zeros(0, p, dtype=torch.float64, device=device)
        self.yy = torch.zeros(0, 0, dtype=torch.float64, device=device)  # Y Y^T
        self.oy = torch.zeros(0, 0, dtype=torch.float64, device=device)  # Omega Y^T

    @property
    def dim(self) -> int:
        """Products taken so far."""
        return int(self.omega.shape[0])

    def grow(self, dim: int, block_size: int, progress: bool) -> tuple[int, int]:
        """Take products until the sketch has ``dim`` of them, ``block_size`` per pass over the
        data; returns the new products and passes."""
        curv, new = self.curvature, dim - self.dim
        if new <= 0:
            return 0, 0
        rows = _random(new, curv.n_params, self.generator, curv.dtype, curv.device)
        fresh = _orthonormal(rows, self.omega, self.generator)
        images = []
        bar = tqdm(total=new, desc="Nystrom", disable=not progress, leave=False)
        for start in range(0, new, block_size):
            images.append(curv.matvec(fresh[start : start + block_size]).double())
            bar.update(min(block_size, new - start))
        bar.close()
        self.omega = torch.cat([self.omega, fresh])
        self.images = torch.cat([self.images, *images])
        self._extend_grams(new)
        return new, -(-new // block_size)

    def _extend_grams(self, new: int) -> None:
        """Add the inner products of the ``new`` last rows to ``Y Y^T`` and ``Omega Y^T``."""
        dim, old = self.dim, self.dim - new
        yy = torch.zeros(dim, dim, dtype=torch.float64, device=self.images.device)
        oy = torch.zeros_like(yy)
        yy[:old, :old], oy[:old, :old] = self.yy, self.oy
        for cols in column_chunks(self.curvature.n_params, dim):
            y, om = self.images[:, cols], self.omega[:, cols].double()
            yy[:, old:] += y @ y[old:].T
            oy[:, old:] += om @ y[old:].T
            oy[old:, :old] += om[old:] @ y[:old].T
        yy[old:, :old] = yy[:old, old:].T
        self.yy, self.oy = yy, oy

    def _factors(self) -> tuple[float, Tensor, Tensor, Tensor]:
        """``nu``, the Cholesky factor ``C`` of ``Omega Y_nu^T``, and the eigenvalues ``s^2`` and
        eigenvectors ``u`` of the Gram matrix ``C^-1 Y_nu Y_nu^T C^-T``."""
        dim, p, dtype = self.dim, self.curvature.n_params, self.curvature.dtype
        nu = math.sqrt(p) * torch.finfo(dtype).eps * math.sqrt(float(self.yy.trace().clamp_min(0)))
        eye = torch.eye(dim, dtype=torch.float64, device=self.yy.device)
        core = self.oy + nu * eye  # Omega Y_nu^T, Omega's rows orthonormal
        factor, info = torch.linalg.cholesky_ex((core + core.T) / 2)
        if int(info) != 0:
            raise ValueError(
                "The Nystrom approximation needs a positive semi-definite curvature, and this "
                "one has negative curvature (the Hessian of a non-convex model). Use "
                "curvature='gauss_newton' or `LowRank(method='lanczos')`."
            )
        outer = self.yy + nu * (self.oy + self.oy.T) + nu**2 * eye  # Y_nu Y_nu^T
        half = torch.linalg.solve_triangular(factor, outer, upper=False)
        gram = torch.linalg.solve_triangular(factor, half.T, upper=False)
        squares, u = torch.linalg.eigh((gram + gram.T) / 2)
        return nu, factor, squares.clamp_min(0.0), u

    def eigenvalues(self) -> Tensor:
        """The approximation's eigenvalues ``[dim]`` (ascending), from the small Gram matrices
        alone: no pass over the parameters."""
        nu, _, squares, _ = self._factors()
        return (squares - nu).clamp_min(0.0).to(self.curvature.dtype)

    def eigenpairs(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues ``[dim]`` and eigenvectors as rows ``[dim, p]`` of the approximation.

        The eigenvectors ``U^T C^-1 Y_nu / s`` take one pass over chunks of columns
        (:func:`column_chunks`), so the working memory beyond the sketch is the eigenvectors
        returned and one chunk.
        """
        dim, p, dtype = self.dim, self.curvature.n_params, self.curvature.dtype
        nu, factor, squares, u = self._factors()
        sing = squares.sqrt()
        kept = sing > torch.finfo(sing.dtype).eps * sing.max().clamp_min(1e-300) * dim
        weights = torch.where(kept[:, None], u.T / sing.clamp_min(1e-300)[:, None], 0.0)
        vh = torch.empty(dim, p, dtype=dtype, device=self.omega.device)
        for cols in column_chunks(p, dim):
            shifted = self.images[:, cols] + nu * self.omega[:, cols].double()
            vh[:, cols] = weights @ torch.linalg.solve_triangular(factor, shifted, upper=False)
        evals = (squares - nu).clamp_min(0.0)
        return evals.to(dtype), vh


def bytes_per_vector(p: int, itemsize: int) -> int:
    """Bytes a sketch holds per vector at its peak, for ``p`` parameters: its test vector and
    the eigenvector returned in the working precision, its product in float64, and while it
    grows the eigenvectors of the smaller sketch, the new test vectors in the making and a copy
    of the old rows (about ``4 itemsize + 16`` per parameter). The curvature products' own
    working memory (bounded by the curvature) comes on top.

    Example:
        >>> bytes_per_vector(1000, itemsize=4)
        32000
    """
    return p * (4 * itemsize + 2 * 8)


# float64 numbers in one chunk of columns of a [dim, p] step (32 MiB)
_CHUNK_NUMBERS = 2**22


def column_chunks(p: int, rows: int) -> list[slice]:
    """Slices of ``range(p)`` whose ``[rows, chunk]`` float64 blocks hold 32 MiB at most.

    Example:
        >>> column_chunks(5, rows=2**21)  # 2 columns of 2**21 rows hold 2**22 numbers
        [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    width = max(1, _CHUNK_NUMBERS // max(rows, 1))
    return [slice(start, min(start + width, p)) for start in range(0, p, width)]


def _random(
    rows: int, p: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    # Drawn in float32 (four times faster than float64 on CPU) whatever the working dtype.
    return torch.randn(rows, p, generator=generator).to(dtype=dtype, device=device)


def _orthonormal(block: Tensor, basis: Tensor, generator: torch.Generator) -> Tensor:
    """Rows of ``block`` made orthonormal to ``basis`` and to each other (Gram-Schmidt, twice).

    A row that vanishes (the Krylov space became invariant) is replaced by a random vector, so
    the basis always grows: at full dimension it spans the whole parameter space.
    """
    p = block.shape[1]
    eps = 10 * torch.finfo(block.dtype).eps * math.sqrt(p)
    norms = block.norm(dim=1)
    v = block
    for _ in range(2):
        if basis.shape[0]:
            v = v - (v @ basis.T) @ basis
    q, r = torch.linalg.qr(v.T)
    if bool((torch.diagonal(r).abs() > eps * norms.clamp_min(1e-300)).all()):
        if not basis.shape[0]:
            return q.T.contiguous()
        # Heavy cancellation leaves the new rows slightly tilted towards the basis: once more.
        q = q.T - (q.T @ basis.T) @ basis
        return torch.linalg.qr(q.T)[0].T.contiguous()
    return _orthonormal_rows(block, basis, generator, eps)


def _orthonormal_rows(
    block: Tensor, basis: Tensor, generator: torch.Generator, eps: float
) -> Tensor:
    """Row-by-row Gram-Schmidt that replaces rows lying in the span by random vectors."""
    p = block.shape[1]
    rows: list[Tensor] = []
    for i in range(block.shape[0]):
        v = block[i].clone()
        for _attempt in range(5):
            norm0 = float(v.norm())
            for _ in range(2):
                if basis.shape[0]:
                    v -= (basis @ v) @ basis
                for r in rows:
                    v -= (r @ v) * r
            norm = float(v.norm())
            if norm > eps * max(norm0, 1e-300) and norm > 0:
                rows.append(v / norm)
                break
            v = _random(1, p, generator, block.dtype, block.device)[0]
        else:  # pragma: no cover - only when the basis already spans everything
            raise RuntimeError("Lanczos could not extend the basis; the space is exhausted.")
    return torch.stack(rows)
