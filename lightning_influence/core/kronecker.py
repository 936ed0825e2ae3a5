"""Kronecker-factored Gauss-Newton blocks per layer, with eigenvalues corrected (EK-FAC).

For a linear layer with input ``a`` (a 1 appended when its bias is chosen) and output gradient
``g``, an example's weight gradient is ``sum_t g_t a_t^T`` over its positions ``t``. Its
Gauss-Newton block is approximated by ``A (x) G`` with ``A = E[a a^T]`` and ``G = E[g g^T]``,
where ``g`` runs over the backward passes of the columns of ``C_b = U_b sqrt(L_b)``, the
eigenpairs of each example's loss Hessian with respect to its outputs (so ``sum_s c_s c_s^T``
is that Hessian and the sum is the Gauss-Newton matrix itself, not an estimate of it). A second
pass replaces the Kronecker eigenvalues by ``E[sum_s (Q_G^T W_s Q_A)^2]``, ``W_s`` the example's
gradient for output direction ``s``: the exact diagonal of the layer's Gauss-Newton block in the
eigenbasis ``Q_A (x) Q_G``. Blocks are per layer, so cross-layer curvature is left out.

Two passes over the data, one forward and one backward pass per output direction (or per random
combination of them, :class:`OutputDirections`) each;
memory holds the factors (``in^2 + out^2 + in out`` numbers per layer), never ``n_train x p``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_influence.core.data import IndexedData
from lightning_influence.core.kronecker_layers import KroneckerLayer, kronecker_layers
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.operators import CurvatureOperator
from lightning_influence.core.products import output_hessians

__all__ = ["OutputDirections", "eigenvalue_corrected_factors", "kronecker_factors"]

# Per-example output Hessians and rotated gradients of a batch: never more than this at once.
_CHUNK_BYTES = 256 * 2**20


def kronecker_factors(
    curvature: CurvatureOperator,
    directions: OutputDirections | None = None,
    progress: bool = False,
) -> tuple[list[KroneckerLayer], dict[str, float]]:
    """The eigenvalue-corrected Kronecker factors of a Gauss-Newton ``curvature``, per layer, and
    timings: from the model and training data behind it (a
    :class:`~lightning_influence.Curvature`), summed across processes as its products are.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence.core.curvature import Curvature
        >>> from lightning_influence.core.data import as_indexed
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> data = as_indexed(TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,))))
        >>> layers, info = kronecker_factors(Curvature(fm, data))
        >>> [tuple(layer.eigenvalues.shape) for layer in layers]
        [(3, 5)]
    """
    model, data = getattr(curvature, "model", None), getattr(curvature, "data", None)
    if not isinstance(model, FunctionalModel) or not isinstance(data, IndexedData):
        raise _error(
            "EKFAC builds its factors from the model and training data behind the curvature "
            f"(a lightning_influence Curvature); got {type(curvature).__name__}. Use Exact(), "
            "CG() or LiSSA() with a curvature given only by its products."
        )
    if not curvature.positive_semidefinite:
        raise _error(
            "EKFAC approximates the Gauss-Newton matrix; pass curvature='gauss_newton' (the "
            "default), or use LiSSA() or Exact() for the Hessian."
        )
    layers, rest = kronecker_layers(model)
    if rest:
        keep = sorted({f"{layer.name}.*" for layer in layers})
        hint = f"`parameters={keep}`" if keep else "`parameters=` naming linear layers"
        raise _error(
            "EKFAC covers the weights and biases of nn.Linear layers (and linear layers with "
            "weights stored [in, out], such as GPT-2's Conv1D), each used by one layer only; "
            f"these chosen parameters are not: {rest[:20]}{' ...' if len(rest) > 20 else ''}. "
            f"Pass {hint} to leave them out, or use LiSSA(), which covers every parameter."
        )
    reduce = getattr(curvature, "reduce", None)
    n_total = int(curvature.n_total)
    info = eigenvalue_corrected_factors(model, data, layers, n_total, reduce, directions, progress)
    return layers, info


def eigenvalue_corrected_factors(
    model: FunctionalModel,
    data: IndexedData,
    layers: list[KroneckerLayer],
    n_total: int,
    reduce: Any = None,
    directions: OutputDirections | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Fill each layer's eigenbases ``Q_A``, ``Q_G`` and corrected eigenvalues from two passes
    over ``data`` (``reduce`` sums across processes; ``n_total`` examples in all), with output
    gradients along ``directions`` (every eigen-direction of each example's output Hessian by
    default: then the eigenvalues are the exact diagonal of each Gauss-Newton block in the
    Kronecker eigenbasis). Returns timings and counts.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence.core.data import as_indexed
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> data = as_indexed(TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,))))
        >>> layers, _ = kronecker_layers(fm)
        >>> info = eigenvalue_corrected_factors(fm, data, layers, n_total=10)
        >>> layers[0].eigenvalues.shape
        torch.Size([3, 5])
    """
    reduce = reduce or (lambda t: t)
    directions = directions or OutputDirections()
    dtype, device = model.dtype, model.device
    a_sums = [torch.zeros(n.n_in_ext, n.n_in_ext, dtype=dtype, device=device) for n in layers]
    g_sums = [torch.zeros(n.n_out, n.n_out, dtype=dtype, device=device) for n in layers]
    started = time.perf_counter()
    passes = 0
    for a_list, g_list in _passes(model, data, layers, directions, progress, "factors"):
        for i, (a, g) in enumerate(zip(a_list, g_list, strict=True)):
            a_sums[i].addmm_(a.flatten(0, 1).T, a.flatten(0, 1))
            g_sums[i].addmm_(g.flatten(0, 2).T, g.flatten(0, 2))
            passes = max(passes, g.shape[0])
    info = {"time_factors": time.perf_counter() - started}
    started = time.perf_counter()
    for layer, a_sum, g_sum in zip(layers, a_sums, g_sums, strict=True):
        layer.a_basis = _eigenbasis(reduce(a_sum) / n_total)
        layer.g_basis = _eigenbasis(reduce(g_sum) / n_total)
    info["time_eigendecomposition"] = time.perf_counter() - started
    started = time.perf_counter()
    sums = [torch.zeros(n.n_out, n.n_in_ext, dtype=dtype, device=device) for n in layers]
    for a_list, g_list in _passes(model, data, layers, directions, progress, "eigenvalues"):
        for i, (layer, a, g) in enumerate(zip(layers, a_list, g_list, strict=True)):
            sums[i] += _squared_gradients(a @ layer.a_basis, g @ layer.g_basis)
    for layer, total in zip(layers, sums, strict=True):
        layer.eigenvalues = reduce(total) / n_total
    info["time_eigenvalue_correction"] = time.perf_counter() - started
    info["backward_passes_per_batch"] = float(passes)
    return info


def _eigenbasis(mat: Tensor) -> Tensor:
    """Eigenvectors of a symmetric positive semi-definite factor, in its own dtype: the second
    pass measures the eigenvalues in this basis, so any orthonormal basis gives a valid
    approximation and float32 suffices."""
    return torch.linalg.eigh((mat + mat.T) / 2).eigenvectors


def _squared_gradients(a_rot: Tensor, g_rot: Tensor) -> Tensor:
    """``sum_{b, s} (sum_t g_bst a_bt^T)^2`` (element-wise square) from rotated inputs
    ``[B, T, in_ext]`` and output gradients ``[d, B, T, out]``: for one position per example the
    square of an outer product is the outer product of squares."""
    _, positions, n_in = a_rot.shape
    if positions == 1:
        return g_rot.square().sum(0)[:, 0].T @ a_rot[:, 0].square()
    n_out = g_rot.shape[-1]
    total = torch.zeros(n_out, n_in, dtype=a_rot.dtype, device=a_rot.device)
    per_chunk = max(1, _CHUNK_BYTES // (n_out * n_in * a_rot.element_size()))
    pairs = g_rot.flatten(0, 1)  # [d B, T, out]: direction s of example b at s B + b
    inputs = a_rot.repeat(g_rot.shape[0], 1, 1)
    for start in range(0, pairs.shape[0], per_chunk):
        chunk = slice(start, start + per_chunk)
        total += torch.bmm(pairs[chunk].transpose(1, 2), inputs[chunk]).square().sum(0)
    return total


def _passes(
    model: FunctionalModel,
    data: IndexedData,
    layers: list[KroneckerLayer],
    directions: OutputDirections,
    progress: bool,
    what: str,
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """One pass over ``data``: per batch, each layer's inputs ``[B, T, in_ext]`` and output
    gradients ``[d, B, T, out]`` for the ``d`` kept output directions (``T`` positions)."""
    bar = tqdm(total=len(data), desc=f"EK-FAC {what}", disable=not progress, leave=False)
    for _, batch in data.batches():
        prepared = model.prepare(batch)
        yield _batch_factors(model, prepared.inputs, prepared.targets, layers, directions)
        bar.update(prepared.size)
    bar.close()


def _batch_factors(
    model: FunctionalModel,
    inputs: Any,
    targets: Any,
    layers: list[KroneckerLayer],
    directions: OutputDirections,
) -> tuple[list[Tensor], list[Tensor]]:
    """One forward pass of a batch and one backward pass per output direction: each layer's
    inputs and output gradients, as :func:`_passes` yields them."""
    captured: dict[str, tuple[list[Tensor], list[Tensor]]] = {n.name: ([], []) for n in layers}
    size = model.task.batch_size(inputs)
    with torch.enable_grad(), _capture(model.model, captured):
        theta = model.theta.detach().requires_grad_(True)
        out = model.outputs(theta, inputs)
        if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != size:
            raise _error(
                f"EKFAC needs the model's outputs as one batch-first tensor; the task's forward "
                f"returned {type(out).__name__}. Override `Task.forward` to return it."
            )
        cotangents = directions(model, targets, out.detach())
        outputs = [o for n in layers for o in captured[n.name][1]]
        per_direction = []
        for s in range(cotangents.shape[2]):
            grads = torch.autograd.grad(
                out,
                outputs,
                cotangents[:, :, s].reshape(out.shape),
                retain_graph=s + 1 < cotangents.shape[2],
                allow_unused=True,
            )
            per_direction.append(
                [
                    torch.zeros_like(o) if g is None else g
                    for g, o in zip(grads, outputs, strict=True)
                ]
            )
    a_list, g_list = [], []
    position = 0
    for layer in layers:
        ins, outs = captured[layer.name]
        if not ins:
            raise _error(
                f"Layer {layer.name!r} was not called in the model's forward; select parameters "
                "of layers the forward uses with `parameters=`."
            )
        calls = range(position, position + len(outs))
        position += len(outs)
        a = torch.cat([_rows(x, size, layer.n_in) for x in ins], dim=1)  # [B, T, in]
        if layer.weight is None:
            a = a[..., :0]
        if layer.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=2)
        g = a.new_zeros(0, size, a.shape[1], layer.n_out)  # [d, B, T, out]: d may be 0 ...
        if per_direction:  # ... where every output Hessian of the batch vanishes
            g = torch.stack(
                [
                    torch.cat([_rows(d[c], size, layer.n_out) for c in calls], 1)
                    for d in per_direction
                ]
            )
        a_list.append(a)
        g_list.append(g)
    return a_list, g_list


def _rows(t: Tensor, size: int, features: int) -> Tensor:
    """``[B, ..., features]`` as ``[B, positions, features]``."""
    if t.ndim < 2 or t.shape[0] != size or t.shape[-1] != features:
        raise _error(
            f"A layer saw a tensor of shape {tuple(t.shape)}, not batch-first with {features} "
            "features last; EKFAC supports linear layers applied to [batch, ..., features]."
        )
    return t.detach().reshape(size, -1, features)


class OutputDirections:
    """The cotangents that output gradients run along: ``C_b = U_b sqrt(L_b)`` from the
    eigenpairs of each example's loss Hessian with respect to its outputs, so that
    ``C_b C_b^T`` is that Hessian (every direction with a nonzero eigenvalue in the batch); or,
    with ``samples``, that many random sign combinations ``C_b z / sqrt(samples)`` per example,
    whose outer products equal the Hessian in expectation (what labels sampled from the model
    give a softmax, for any loss), one backward pass each.

    Example:
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> out, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
        >>> OutputDirections()(fm, y, out).shape, OutputDirections(samples=1)(fm, y, out).shape
        (torch.Size([5, 3, 2]), torch.Size([5, 3, 1]))
    """

    def __init__(self, samples: int | None = None, seed: int = 0) -> None:
        self.samples = samples
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: FunctionalModel, targets: Any, out: Tensor) -> Tensor:
        """Cotangents ``[B, k, d]`` for outputs ``out`` ``[B, ...]`` (``k`` per example)."""
        batch, k = out.shape[0], out[0].numel()
        if batch * k * k * out.element_size() > _CHUNK_BYTES:
            raise _error(
                f"EKFAC needs each example's output Hessian, {k} x {k} here ({batch} examples "
                "per batch): too large. Lower the batch size (`curvature_batch_size`), or use "
                "LiSSA(), which needs no output Hessians."
            )
        h_out = output_hessians(model, targets, out).detach()
        evals, evecs = torch.linalg.eigh((h_out + h_out.transpose(1, 2)) / 2)  # ascending
        evals = evals.clamp_min(0)
        peak = evals.amax(dim=0)  # [k]: the largest eigenvalue of each rank over the batch
        # eigh leaves a zero eigenvalue (softmax's) near eps times the largest: not a direction
        tiny = torch.finfo(out.dtype)
        nonzero = peak > 100 * tiny.eps * peak.max().clamp_min(tiny.tiny)
        columns = torch.nonzero(nonzero).flatten()
        cotangents = evecs[:, :, columns] * evals[:, None, columns].sqrt()
        if self.samples is None:
            return cotangents
        shape = (batch, len(columns), self.samples)
        signs = torch.randint(0, 2, shape, generator=self.generator).to(out) * 2 - 1
        return cotangents @ signs / self.samples**0.5


@contextmanager
def _capture(
    root: nn.Module, captured: dict[str, tuple[list[Tensor], list[Tensor]]]
) -> Iterator[None]:
    """Each named layer's inputs (detached) and outputs (in the graph), one pair per call."""

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
                raise _error(f"Layer {name!r} was called without a tensor input and output.")
            captured[name][0].append(args[0].detach())
            captured[name][1].append(output)

        return record

    handles = [root.get_submodule(n).register_forward_hook(hook(n)) for n in captured]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _error(message: str) -> Exception:
    from lightning_influence.errors import InfluenceError  # errors imports the solvers

    return InfluenceError(message)
