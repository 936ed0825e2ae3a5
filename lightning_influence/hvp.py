"""Curvature-vector products of the mean training loss, over a block of vectors at once.

:class:`Curvature` is the one object every solver consumes: ``matvec(V)`` applies the curvature
of the mean training loss to each row of ``V`` (shape ``[m, p]``), ``sample_matvec`` does the same
on a random minibatch (for stochastic solvers), and ``dense()`` builds the whole matrix for small
models. Two curvatures are offered: the Hessian, and the Gauss-Newton matrix ``J^T H_out J``
(positive semi-definite even for non-convex models). Damping is added by the solvers, never here.
Under data parallelism ``reduce`` sums across processes, so every process sees the same product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from lightning_influence.data import IndexedData
from lightning_influence.params import FunctionalModel

__all__ = ["Curvature", "CurvatureKind"]

CurvatureKind = Literal["gauss_newton", "hessian"]
Reduce = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


class Curvature:
    """Curvature of the mean training loss as products with blocks of vectors.

    Args:
        model: the model as a function of its flat parameters.
        data: the training data the curvature averages over.
        kind: ``"gauss_newton"`` or ``"hessian"``.
        reduce: sums a tensor across processes (identity on one process).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence.data import as_indexed
        >>> from lightning_influence.params import FunctionalModel
        >>> from lightning_influence.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> data = as_indexed(TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,))))
        >>> curvature = Curvature(fm, data, kind="hessian")
        >>> curvature.matvec(torch.randn(2, 15)).shape
        torch.Size([2, 15])
    """

    def __init__(
        self,
        model: FunctionalModel,
        data: IndexedData,
        kind: CurvatureKind = "gauss_newton",
        reduce: Reduce | None = None,
    ) -> None:
        if kind not in ("gauss_newton", "hessian"):
            raise ValueError(f"`curvature` must be 'gauss_newton' or 'hessian', got {kind!r}.")
        self.model = model
        self.data = data
        self.kind = kind
        self.reduce = reduce or _identity
        local = torch.tensor(float(len(data)), dtype=torch.float64, device=model.device)
        self.n_total = int(self.reduce(local).item())
        if self.n_total == 0:
            raise ValueError("The training data is empty: there is no curvature to compute.")

    @property
    def n_params(self) -> int:
        """Dimension of the parameter space."""
        return self.model.n_params

    def batch_matvec(self, batch: Any, vectors: Tensor) -> Tensor:
        """Summed curvature of the examples in ``batch`` applied to each row of ``vectors``."""
        fm = self.model
        inputs, targets = fm.task.unpack(batch)
        inputs, targets = fm.cast(inputs), fm.cast(targets)
        theta = fm.theta
        vectors = vectors.to(dtype=theta.dtype, device=theta.device)
        with torch.enable_grad():
            if self.kind == "hessian":

                def total(th: Tensor) -> Tensor:
                    return fm.losses(th, inputs, targets).sum()

                def hv(v: Tensor) -> Tensor:
                    return jvp(grad(total), (theta,), (v,))[1]

                return vmap(hv)(vectors)

            def outputs(th: Tensor) -> Any:
                return fm.outputs(th, inputs)

            out, pullback = vjp(outputs, theta)  # type: ignore[misc]
            out = _detach(out)

            def loss_of_outputs(o: Any) -> Tensor:
                return fm.losses_from_outputs(o, targets).sum()

            def gnv(v: Tensor) -> Tensor:
                jv = jvp(outputs, (theta,), (v,))[1]
                hjv = jvp(grad(loss_of_outputs), (out,), (jv,))[1]
                return pullback(hjv)[0]

            return vmap(gnv)(vectors)

    def matvec(self, vectors: Tensor) -> Tensor:
        """Mean curvature over all training data applied to each row of ``vectors`` ``[m, p]``."""
        acc = torch.zeros_like(vectors, dtype=self.model.dtype, device=self.model.device)
        for _, batch in self.data.batches():
            acc += self.batch_matvec(batch, vectors).detach()
        return self.reduce(acc) / self.n_total

    def sample(self, batch_size: int, generator: torch.Generator) -> Any:
        """A random minibatch of this process's training data, drawn without replacement."""
        n_local = len(self.data)
        pos = torch.randperm(n_local, generator=generator)[: min(batch_size, n_local)]
        return self.data.fetch(self.data.indices[pos])

    def minibatch_matvec(self, batch: Any, vectors: Tensor) -> Tensor:
        """Mean curvature of ``batch`` (pooled over processes) times the rows of ``vectors``."""
        out = self.batch_matvec(batch, vectors).detach()
        size = self.model.task.batch_size(self.model.task.unpack(batch)[0])
        count = torch.tensor(float(size), dtype=out.dtype, device=out.device)
        return self.reduce(out) / self.reduce(count)

    def dense(self, chunk: int = 256) -> Tensor:
        """The whole ``[p, p]`` curvature matrix, built from products with identity blocks."""
        p = self.n_params
        eye = torch.eye(p, dtype=self.model.dtype, device=self.model.device)
        cols = [self.matvec(eye[i : i + chunk]) for i in range(0, p, chunk)]
        mat = torch.cat(cols)
        return (mat + mat.T) / 2


def _detach(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, dict):
        return {k: _detach(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_detach(v) for v in tree)
    return tree
