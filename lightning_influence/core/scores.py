"""Influence scores, streamed over the training set one batch of gradients at a time.

Memory holds the validation inverse-HVPs ``[m, p]`` and one batch of training gradients
``[batch, p]``, never ``[n_train, p]``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap
from tqdm.auto import tqdm

from lightning_influence.core.data import IndexedData
from lightning_influence.core.gradients import PerSampleGradients, one_example, rows_of
from lightning_influence.core.layerwise import LayerwiseDots
from lightning_influence.core.model import Batch, FunctionalModel
from lightning_influence.core.operators import EigenInverse, InverseOperator
from lightning_influence.core.precision import check_scoring_dtype, scoring_autocast
from lightning_influence.core.routes import refused

__all__ = [
    "ExamplePass",
    "example_pass",
    "pairs_per_chunk",
    "perturbation_influence",
    "perturbation_pairs",
    "quadratic_form",
]


@dataclass
class ExamplePass:
    """What one streamed pass over a set of examples collected, each row a dataset index."""

    indices: Tensor
    losses: Tensor
    targets: Tensor | None
    predictions: Tensor | None
    scores: Tensor | None = None
    self_influence: Tensor | None = None
    gradients: Tensor | None = None


def _labels(t: Any, n: int, dtype: torch.dtype) -> Tensor | None:
    if isinstance(t, Tensor) and t.ndim == 1 and t.shape[0] == n:
        return (t.to(dtype) if t.is_floating_point() else t).detach().cpu()
    return None


def example_pass(
    model: FunctionalModel,
    data: IndexedData,
    val_inverse: Tensor | None = None,
    inverse: InverseOperator | None = None,
    keep_gradients: bool = False,
    progress: bool = False,
    desc: str = "Scoring",
    gradients: PerSampleGradients | None = None,
    scoring_dtype: torch.dtype | None = None,
) -> ExamplePass:
    """Stream per-sample gradients over ``data`` and reduce each batch at once.

    With ``val_inverse`` (``S``, shape ``[m, p]``) it computes ``scores = -G S^T``; with
    ``inverse`` (``(H + damping I)^-1`` on a block) the self-influence ``g^T (H + damping I)^-1 g``;
    ``keep_gradients`` keeps ``G`` (only for small sets, such as the validation points).
    Each batch is unpacked and cast once and runs one forward pass (for losses and predictions)
    besides its per-sample gradients; pass ``gradients`` to share one vmap fallback decision.

    Layers with a layer-wise rule (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``) give their
    share of ``G S^T`` (and, with a low-rank inverse, of ``G U^T`` for its eigenvectors ``U``)
    from one forward and one backward pass of the batch, never forming their part of ``G``
    (:mod:`.layerwise`); the first batch checks it against per-sample gradients on a few
    examples.

    ``scoring_dtype`` (``torch.bfloat16`` or ``torch.float16``) runs the layer-wise route in that
    dtype: its forward and backward pass under autocast, its products with the rows in that
    dtype, their sums in the working one (float32). The per-sample route (parameters without a
    layer-wise rule, or all of them when the route is off) keeps the working dtype: its
    ``[batch, p]`` gradients cost the same either way, and vmap does not batch every layer's
    backward under autocast. ``val_inverse``, quadratic forms and every result stay float32.
    """
    check_scoring_dtype(model.dtype, model.device, scoring_dtype)
    gradients = gradients or PerSampleGradients(model)
    layerwise = _layerwise(model, val_inverse, inverse, keep_gradients, scoring_dtype)
    if scoring_dtype is not None and layerwise is None:
        warnings.warn(
            f"`scoring_dtype={str(scoring_dtype).removeprefix('torch.')!r}` has no effect on this "
            "pass: it lowers the layer-wise route (nn.Linear, nn.Conv2d and nn.Embedding layers; "
            "for self-influence, a low-rank inverse such as LowRank()), and none is taken, so "
            f"every score comes from per-sample gradients in {model.dtype}.",
            stacklevel=2,
        )
    checked = False
    idx_parts: list[Tensor] = []
    parts: dict[str, list[Tensor]] = {k: [] for k in ("loss", "score", "self", "grad")}
    targets: list[Tensor | None] = []
    preds: list[Tensor | None] = []
    bar = tqdm(total=len(data), desc=desc, disable=not progress, leave=False, unit="ex")
    for idx, batch in data.batches():
        prepared = model.prepare(batch)
        inputs, tgt, size = prepared.inputs, prepared.targets, prepared.size
        if layerwise is not None and not checked:
            checked = True
            layerwise = layerwise if layerwise.agrees(inputs, tgt, gradients) else None
        if layerwise is not None:
            outputs, dots, norms = layerwise(inputs, tgt)
            with scoring_autocast(model.device, scoring_dtype):
                losses = model.losses_from_outputs(outputs, tgt, size)
            parts["loss"].append(losses.to(model.dtype).cpu())
            m = 0 if val_inverse is None else val_inverse.shape[0]
            if val_inverse is not None:
                parts["score"].append((-dots[:, :m]).cpu())
            if isinstance(inverse, EigenInverse):
                parts["self"].append(inverse.quadratic_from(norms, dots[:, m:]).cpu())
            idx_parts.append(idx)
            targets.append(_labels(tgt, size, model.dtype))
            preds.append(_labels(model.task.predict(outputs), size, model.dtype))
            bar.update(size)
            continue
        with torch.no_grad():
            outputs = model.outputs(model.theta, inputs)
            parts["loss"].append(model.losses_from_outputs(outputs, tgt, size).cpu())
        prediction = model.task.predict(outputs)
        g = gradients(inputs, tgt).detach()
        if val_inverse is not None:
            parts["score"].append((-(g @ val_inverse.to(g.dtype).T)).cpu())
        if inverse is not None:
            parts["self"].append(inverse.quadratic(g).to(g.dtype).cpu())
        if keep_gradients:
            parts["grad"].append(g)
        idx_parts.append(idx)
        targets.append(_labels(tgt, size, model.dtype))
        preds.append(_labels(prediction, size, model.dtype))
        bar.update(size)
    bar.close()

    def cat(items: list[Any]) -> Tensor | None:
        return torch.cat(items) if items and all(t is not None for t in items) else None

    return ExamplePass(
        indices=torch.cat(idx_parts) if idx_parts else torch.zeros(0, dtype=torch.long),
        losses=torch.cat(parts["loss"]) if parts["loss"] else torch.zeros(0),
        targets=cat(targets),
        predictions=cat(preds),
        scores=cat(parts["score"]) if val_inverse is not None else None,
        self_influence=cat(parts["self"]) if inverse is not None else None,
        gradients=cat(parts["grad"]) if keep_gradients else None,
    )


def _layerwise(
    model: FunctionalModel,
    val_inverse: Tensor | None,
    inverse: InverseOperator | None,
    keep_gradients: bool,
    scoring_dtype: torch.dtype | None = None,
) -> LayerwiseDots | None:
    """The layer-wise route when it covers a parameter and every quantity asked for: scores, and
    self-influence with a low-rank inverse whose eigenvectors span under half the space."""
    if keep_gradients or (val_inverse is None and inverse is None):
        return None
    rows = [] if val_inverse is None else [val_inverse]
    if inverse is not None:
        if not isinstance(inverse, EigenInverse) or inverse.explicit_rest:
            return None
        rows.append(inverse.evecs)
    dtype = model.dtype
    layerwise = LayerwiseDots(
        model,
        torch.cat([r.to(device=model.device, dtype=dtype) for r in rows]),
        scoring_dtype,
        norms=inverse is not None,  # squared norms serve self-influence only
    )
    return layerwise if layerwise.covers_any else None


def quadratic_form(inverse: InverseOperator, g: Tensor) -> Tensor:
    """``g_i^T inverse(g_i)`` per row ``g_i`` of ``g``: self-influence for an inverse of the damped
    curvature, computed the way the training pass computes it.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> twice = SimpleNamespace(quadratic=lambda v: 2 * v.square().sum(1))  # (I / 2)^-1
        >>> quadratic_form(twice, torch.tensor([[1.0, 2.0], [0.0, 3.0]]))
        tensor([10., 18.])
    """
    return inverse.quadratic(g).to(g.dtype)


# (example, vector) pairs differentiated at once in perturbation maps: each holds about one
# per-example gradient (p values) and its input
PAIR_CHUNK_BYTES = 32 * 2**20


def pairs_per_chunk(model: FunctionalModel, input_numel: int, at_least: int = 1) -> int:
    """How many (example, vector) pairs :func:`perturbation_pairs` differentiates at once: those
    whose gradients and inputs fit in ``PAIR_CHUNK_BYTES``, and at least ``at_least`` (such as a
    batch, whose gradients the training pass holds anyway); at most the task's ``chunk_size``.

    Example:
        >>> import torch
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> pairs_per_chunk(fm, input_numel=4)  # 32 MiB over (15 + 4) float32 values
        441505
    """
    chunk = max(
        at_least, PAIR_CHUNK_BYTES // (model.theta.element_size() * (model.n_params + input_numel))
    )
    limit = model.task.chunk_size
    return max(1, chunk if limit is None else min(chunk, limit))


def perturbation_pairs(
    model: FunctionalModel,
    batch: Any,
    val_inverse: Tensor,
    examples: Tensor,
    vectors: Tensor,
    chunk_size: int | None = None,
) -> Tensor:
    """``I_pert,loss`` for pairs: ``-s^T grad_x grad_theta L(z)`` for example ``examples[q]`` of
    ``batch`` and row ``vectors[q]`` of ``val_inverse``, shaped ``[pairs, *input_shape]``.

    The batch is unpacked and cast once, however many pairs use each example; the pairs are
    differentiated ``chunk_size`` at a time (by default :func:`pairs_per_chunk`, at least the
    batch). Needs floating-point tensor inputs.

    Example:
        >>> import torch
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> batch = (torch.randn(2, 4), torch.tensor([0, 2]))
        >>> perturbation_pairs(fm, batch, torch.randn(3, 15), torch.tensor([0, 1, 1]),
        ...                    torch.tensor([2, 0, 2])).shape
        torch.Size([3, 4])
    """
    prepared = _float_inputs(model, batch)
    return _pair_maps(model, prepared, val_inverse, examples, vectors, chunk_size)


def perturbation_influence(model: FunctionalModel, batch: Any, val_inverse: Tensor) -> Tensor:
    """``I_pert,loss``: for each example of ``batch`` and each row ``s`` of ``val_inverse``,
    ``-s^T grad_x grad_theta L(z)``, shaped ``[batch, m, *input_shape]``.

    It is the direction in input space along which a small change of the training input most
    raises the validation loss. Needs floating-point tensor inputs. The ``batch x m`` pairs are
    differentiated together, in chunks (see :func:`perturbation_pairs`).

    Example:
        >>> import torch
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> batch = (torch.randn(2, 4), torch.tensor([0, 2]))
        >>> perturbation_influence(fm, batch, torch.randn(3, 15)).shape
        torch.Size([2, 3, 4])
    """
    prepared = _float_inputs(model, batch)
    n, m = prepared.size, val_inverse.shape[0]
    examples, vectors = torch.arange(n).repeat_interleave(m), torch.arange(m).repeat(n)
    maps = _pair_maps(model, prepared, val_inverse, examples, vectors, None)
    return maps.reshape(n, m, *maps.shape[1:])


def _float_inputs(model: FunctionalModel, batch: Any) -> Batch:
    prepared = model.prepare(batch)
    if not isinstance(prepared.inputs, Tensor) or not prepared.inputs.is_floating_point():
        raise TypeError(
            "Perturbation influence needs floating-point tensor inputs (an image or feature "
            f"vector); got {type(prepared.inputs).__name__}."
        )
    return prepared


def _pair_maps(
    model: FunctionalModel,
    prepared: Batch,
    val_inverse: Tensor,
    examples: Tensor,
    vectors: Tensor,
    chunk_size: int | None,
) -> Tensor:
    inputs, targets = prepared.inputs, prepared.targets
    s = val_inverse.to(device=model.device, dtype=model.dtype)
    examples, vectors = examples.to(model.device), vectors.to(model.device)
    chunk = chunk_size or pairs_per_chunk(model, inputs[0].numel(), prepared.size)

    def directional(x: Tensor, y: Any, v: Tensor) -> Tensor:
        g = grad(lambda th: model.losses(th, one_example(x), one_example(y))[0])(model.theta)
        return -(g * v).sum()

    maps = [inputs.new_zeros((0, *inputs.shape[1:]))]
    with torch.enable_grad():
        for start in range(0, examples.numel(), chunk):
            rows, cols = examples[start : start + chunk], vectors[start : start + chunk]
            x, y, v = inputs[rows], rows_of(targets, rows), s[cols]
            if model.routes.get("perturbation_maps") is None:
                try:
                    maps.append(vmap(grad(directional))(x, y, v))
                    continue
                except (RuntimeError, NotImplementedError) as err:
                    if not refused(err):
                        raise
                    model.routes.fall_back("perturbation_maps", "double_backward", err)
            maps.append(torch.stack([_pair_map(model, x, y, v, q) for q in range(len(rows))]))
    return torch.cat(maps).detach()


def _pair_map(model: FunctionalModel, x: Tensor, y: Any, v: Tensor, q: int) -> Tensor:
    """Pair ``q``'s map by plain autograd: the input gradient of ``-v_q^T g(z_q)``, through the
    gradient's graph (where ``torch.func`` refuses the model)."""
    inputs = x[q : q + 1].detach().requires_grad_(True)
    theta = model.theta.detach().requires_grad_(True)
    loss = model.losses(theta, inputs, one_example(y, q)).sum()
    (g,) = torch.autograd.grad(loss, theta, create_graph=True)
    (dx,) = torch.autograd.grad(
        -(g * v[q]).sum(), inputs, allow_unused=True, materialize_grads=True
    )
    return dx[0]
