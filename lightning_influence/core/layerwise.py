"""Dot products of per-sample gradients with fixed rows, layer by layer, without ``[batch, p]``.

For an ``nn.Linear`` layer (any leading dimensions) an example's weight gradient is
``sum_t g_t a_t^T`` over its positions ``t``, with ``a_t`` the layer's input and ``g_t`` the
gradient of the example's loss with respect to the layer's output. Its dot product with a row
``S`` reshaped to the weight is ``sum_t g_t^T S a_t``, and its squared norm
``sum_{t,s} (g_t . g_s)(a_t . a_s)``: both come from the two factors, captured by module hooks
in one forward and one backward pass of the summed loss (examples' losses are independent, so
its output gradients are the per-example ones). Parameters of other layers fall back to
per-sample gradients of those parameters alone.

With a ``scoring_dtype`` (bfloat16 or float16) the forward and backward passes run under
autocast and the layers' products take their factors and rows in that dtype; each product's
last contraction and every sum over layers is in the working precision. Parameters on the
per-sample route keep the working precision.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_influence.core.gradients import PerSampleGradients, rows_of
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.precision import scoring_autocast
from lightning_influence.core.products import detach

__all__ = ["LayerwiseDots", "layerwise_parameters"]

_CHECKED_EXAMPLES = 4


def _covered(module: nn.Module, leaf: str) -> bool:
    """Whether a layer-wise rule covers parameter ``leaf`` of ``module``."""
    if type(module) is nn.Linear:
        return leaf in ("weight", "bias")
    if type(module) is nn.Conv2d:
        plain = module.groups == 1 and module.padding_mode == "zeros"
        return plain and not isinstance(module.padding, str) and leaf in ("weight", "bias")
    if type(module) is nn.Embedding:
        return leaf == "weight" and module.max_norm is None and not module.scale_grad_by_freq
    return False


def layerwise_parameters(model: FunctionalModel) -> list[bool]:
    """For each chosen parameter, whether a layer-wise rule covers it: the weight or bias of an
    ``nn.Linear``, of an ``nn.Conv2d`` (one group, zero padding given as sizes) or the weight of
    an ``nn.Embedding`` (no ``max_norm``, no ``scale_grad_by_freq``), used by that module only.

    Example:
        >>> import torch
        >>> from lightning_influence.core.task import ClassificationTask
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        >>> layerwise_parameters(FunctionalModel(net, ClassificationTask()))
        [True, True, False, False]
    """
    owners: dict[int, int] = {}
    for _, p in model.model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    named = dict(model.model.named_parameters())
    covered = []
    for name in model.names:
        module_name, _, leaf = name.rpartition(".")
        module = model.model.get_submodule(module_name)
        covered.append(_covered(module, leaf) and owners[id(named[name])] == 1)
    return covered


@dataclass
class _Layer:
    module: nn.Module
    weight: Tensor | None  # rows' weight blocks laid out for one matrix product (_weight_layout)
    bias: Tensor | None  # rows' block for the bias, [r, out]
    shape: tuple[int, int, int]  # (rows, out, in)
    inputs: list[Tensor]
    outputs: list[Tensor]
    flat: Tensor | None = None  # rows' weight blocks as they lie in theta, [r, out * in]
    scale: Tensor | None = None  # [r]: blocks are stored divided by it (lowered precision only)


class LayerwiseDots:
    """``G R^T`` and the squared norms of the rows of ``G`` for the per-sample gradients ``G`` of a
    batch and fixed rows ``R`` (``[r, p]``), never forming ``G`` for the covered layers.

    ``scoring_dtype`` (``torch.bfloat16`` or ``torch.float16``) lowers the passes and products
    (see the module's docstring); the results are in the model's working dtype either way.

    Example:
        >>> import torch
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> x, y, rows = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), torch.randn(2, 15)
        >>> _, dots, norms = LayerwiseDots(fm, rows)(x, y)
        >>> g = PerSampleGradients(fm)(x, y)
        >>> torch.allclose(dots, g @ rows.T, atol=1e-5), torch.allclose(norms, g.square().sum(1))
        (True, True)
    """

    def __init__(
        self,
        model: FunctionalModel,
        rows: Tensor,
        scoring_dtype: torch.dtype | None = None,
        norms: bool = True,
    ) -> None:
        self.model = model
        self.scoring_dtype = scoring_dtype
        self.norms = norms  # False: the squared norms are left at zero (no self-influence)
        covered = layerwise_parameters(model)
        rows = rows.to(device=model.device, dtype=model.dtype)
        pieces = torch.split(rows, model.numels, dim=1)
        scales = _block_scales(model.names, pieces, covered) if scoring_dtype else {}
        layers: dict[str, _Layer] = {}
        rest_names, rest_pieces = [], []
        for name, shape, piece, ok in zip(model.names, model.shapes, pieces, covered, strict=True):
            if not ok:
                rest_names.append(name)
                rest_pieces.append(piece)
                continue
            module_name, _, leaf = name.rpartition(".")
            module = model.model.get_submodule(module_name)
            n_out = shape[0]
            n_in = math.prod(shape[1:]) if leaf == "weight" else 0
            layer = layers.setdefault(
                module_name, _Layer(module, None, None, (rows.shape[0], n_out, n_in), [], [])
            )
            if scoring_dtype is not None:
                layer.scale = scales[module_name]
                low = torch.empty(piece.shape, dtype=scoring_dtype, device=piece.device)
                piece = torch.div(piece, layer.scale[:, None], out=low)  # no float32 copy
            if isinstance(module, nn.Embedding):  # [tokens, r, dim]: rows gathered by token
                layer.weight = piece.reshape(rows.shape[0], *shape).transpose(0, 1).contiguous()
            elif leaf == "weight":
                layer.shape = (rows.shape[0], n_out, n_in)
                layer.flat = piece
                layer.weight = _weight_layout(piece.reshape(rows.shape[0], n_out, n_in))
            else:
                layer.bias = piece.contiguous()
        self._layers = list(layers.values())
        self._rows = rows
        self._rest: FunctionalModel | None = None
        self._rest_rows = torch.cat(rest_pieces, dim=1) if rest_pieces else None
        if rest_names:
            self._rest = FunctionalModel(model.model, model.task, rest_names, dtype=model.dtype)
            self._rest_gradients = PerSampleGradients(self._rest)

    @property
    def covers_any(self) -> bool:
        """Whether at least one chosen parameter takes the layer-wise route."""
        return bool(self._layers)

    def __call__(self, inputs: Any, targets: Any) -> tuple[Any, Tensor, Tensor]:
        """``(outputs, G R^T [batch, r], |g_i|^2 [batch])`` for a batch cast by ``prepare``.

        A task's ``chunk_size`` (examples differentiated at once) bounds the activations held,
        as it does for per-sample gradients.
        """
        size = self.model.task.batch_size(inputs)
        chunk = self.model.task.chunk_size
        if chunk is None or chunk >= size:
            return self._chunk(inputs, targets, size)
        parts = []
        for i in range(0, size, chunk):
            x, y = rows_of((inputs, targets), slice(i, i + chunk))
            parts.append(self._chunk(x, y, min(chunk, size - i)))
        flat = [tree_flatten(part[0]) for part in parts]
        columns = zip(*(leaves for leaves, _ in flat), strict=True)
        joined = [torch.cat(c) if isinstance(c[0], Tensor) and c[0].ndim else c[0] for c in columns]
        dots, norms = torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts])
        return tree_unflatten(joined, flat[0][1]), dots, norms

    def _chunk(self, inputs: Any, targets: Any, size: int) -> tuple[Any, Tensor, Tensor]:
        fm = self.model
        compute = self.scoring_dtype or fm.dtype
        for layer in self._layers:
            layer.inputs.clear()
            layer.outputs.clear()
        with torch.enable_grad(), self._hooks(), scoring_autocast(fm.device, self.scoring_dtype):
            theta = fm.theta.detach().requires_grad_(True)
            outputs = fm.outputs(theta, inputs)
            total = fm.losses_from_outputs(outputs, targets, size).sum()
            captured = [out for layer in self._layers for out in layer.outputs]
            grads = torch.autograd.grad(total, captured, allow_unused=True) if captured else ()
        dots = torch.zeros(size, self._rows.shape[0], dtype=fm.dtype, device=fm.device)
        norms = torch.zeros(size, dtype=fm.dtype, device=fm.device)
        position = iter(grads)
        for layer in self._layers:
            for a_in in layer.inputs:
                g_out = next(position)
                if g_out is None:
                    continue
                norm: Tensor | None = None
                if isinstance(layer.module, nn.Embedding):
                    dot, norm = _embedding_terms(
                        layer, a_in, g_out.to(compute), size, fm.dtype, self.norms
                    )
                else:
                    a, g = _factors(layer.module, a_in.to(compute), g_out.to(compute), size)
                    dot = _layer_dots(layer, a, g, fm.dtype)
                    if self.norms:
                        norm = _layer_norms(layer, a, g, fm.dtype)
                dots += dot if layer.scale is None else dot * layer.scale
                if norm is not None:
                    norms += norm
            layer.inputs.clear()
            layer.outputs.clear()
        if self._rest is not None and self._rest_rows is not None:
            rest = self._rest_gradients(inputs, targets).detach()  # in the working dtype
            dots += rest @ self._rest_rows.T
            if self.norms:
                norms += rest.square().sum(dim=1)
        return detach(outputs), dots, norms

    def agrees(self, inputs: Any, targets: Any, gradients: PerSampleGradients) -> bool:
        """Whether the layer-wise dot products match per-sample gradients on a few examples of
        this batch (a layer used outside its ``forward``, or examples that share a loss, would
        not); warns when they do not. Both run in the working precision."""
        n = min(_CHECKED_EXAMPLES, self.model.task.batch_size(inputs))
        x, y = rows_of((inputs, targets), slice(0, n))
        exact = self if self.scoring_dtype is None else LayerwiseDots(self.model, self._rows)
        try:
            _, dots, _ = exact(x, y)
        except (RuntimeError, ValueError) as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        else:
            g = gradients(x, y).detach()
            finite = torch.isfinite(g).all(dim=1)  # an example with a NaN loss is named later
            reference = g[finite] @ self._rows.T
            dots = dots[finite]
            if not reference.numel():
                return True
            scale = reference.abs().max().clamp_min(torch.finfo(reference.dtype).tiny)
            error = float((dots - reference).abs().max() / scale)
            if error <= 1e-3:
                return True
            reason = f"relative difference {error:.2g}"
        warnings.warn(
            f"Layer-wise scores disagree with per-sample gradients on this model ({reason}); "
            "scoring with per-sample gradients instead. A layer whose weights are used outside "
            "its forward, or a loss that mixes examples (batch norm in training mode), does this.",
            stacklevel=3,
        )
        return False

    def _hooks(self) -> AbstractContextManager[None]:
        return capture_layers(self._layers)


class CapturedLayer(Protocol):
    """A layer whose calls :func:`capture_layers` records: its inputs and outputs, per call."""

    module: nn.Module
    inputs: list[Tensor]
    outputs: list[Tensor]


@contextmanager
def capture_layers(layers: Sequence[CapturedLayer]) -> Iterator[None]:
    """Inside the block, every call of ``layer.module`` appends its (detached) input to
    ``layer.inputs`` and its output to ``layer.outputs``."""

    def capture(layer: CapturedLayer) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not args or not isinstance(output, Tensor):
                raise RuntimeError(f"{type(module).__name__} was called without a tensor input")
            layer.inputs.append(args[0].detach())
            layer.outputs.append(output)

        return hook

    handles = [layer.module.register_forward_hook(capture(layer)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _block_scales(
    names: list[str], pieces: tuple[Tensor, ...], covered: list[bool]
) -> dict[str, Tensor]:
    """Per covered module and row, the power of two at or above the row's largest entry there.

    Rows are stored divided by it in the lowered dtype: a solved vector (about ``1 / damping``
    times a gradient) may exceed float16's range, and a layer's share of it may be far smaller
    than another's. Powers of two divide exactly; the dots are multiplied back in float32.
    """
    peaks: dict[str, Tensor] = {}
    for name, piece, ok in zip(names, pieces, covered, strict=True):
        if ok:
            low, high = piece.aminmax(dim=1)
            module_name, peak = name.rpartition(".")[0], torch.maximum(high, -low)
            peaks[module_name] = torch.maximum(peaks.get(module_name, peak), peak)
    tiny = torch.finfo(pieces[0].dtype).tiny
    return {k: torch.exp2(torch.ceil(torch.log2(v.clamp_min(tiny)))) for k, v in peaks.items()}


def _flat(t: Tensor, size: int) -> Tensor:
    """``[batch, *lead, features]`` as ``[batch, positions, features]``."""
    if t.ndim < 2 or t.shape[0] != size:
        raise RuntimeError(f"a layer saw a tensor of shape {tuple(t.shape)}, not batch-first")
    return t.reshape(size, -1, t.shape[-1])


def _factors(module: nn.Module, a_in: Tensor, g_out: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """A layer's input and output gradient as ``[batch, positions, in]`` and
    ``[batch, positions, out]``, so that the weight gradient is ``sum_t g_t a_t^T``."""
    if isinstance(module, nn.Conv2d):
        padding = module.padding
        if a_in.ndim != 4 or a_in.shape[0] != size or isinstance(padding, str):
            raise RuntimeError(f"a Conv2d saw an input of shape {tuple(a_in.shape)}, not batched")
        patches = nn.functional.unfold(
            a_in, module.kernel_size, module.dilation, padding, module.stride
        )
        return patches.transpose(1, 2), g_out.flatten(2).transpose(1, 2)
    return _flat(a_in, size), _flat(g_out, size)


def _embedding_terms(
    layer: _Layer, tokens: Tensor, g_out: Tensor, size: int, acc: torch.dtype, norms: bool
) -> tuple[Tensor, Tensor | None]:
    """Dots and squared norms for an embedding: the gradient is ``sum_t e_{x_t} g_t^T``; sums
    over positions in ``acc``; the norms only when ``norms`` (else ``None``)."""
    module = layer.module
    if not isinstance(module, nn.Embedding) or layer.weight is None:
        raise RuntimeError("an embedding's rows are missing")
    if tokens.shape[0] != size:
        raise RuntimeError(f"an Embedding saw tokens of shape {tuple(tokens.shape)}, not batched")
    x = tokens.reshape(size, -1)
    g = g_out.reshape(size, x.shape[1], module.embedding_dim)
    if module.padding_idx is not None:  # no gradient reaches the padding row
        g = g * (x != module.padding_idx).unsqueeze(-1).to(g.dtype)
    rows = layer.weight.to(g.dtype)[x.reshape(-1)]  # [b * t, r, dim]
    dots = (rows @ g.reshape(-1, module.embedding_dim, 1)).view(size, x.shape[1], -1)
    if not norms:
        return dots.to(acc).sum(dim=1), None
    same = (x.unsqueeze(2) == x.unsqueeze(1)).to(acc)
    squared = (same * (g @ g.transpose(1, 2)).to(acc)).sum(dim=(1, 2))
    return dots.to(acc).sum(dim=1), squared


def _weight_layout(blocks: Tensor) -> Tensor:
    """Rows' weight blocks ``[r, out, in]`` as one matrix that the larger of the layer's two
    factors multiplies: ``[out, r * in]`` (output gradients first) when ``in <= out``, else
    ``[in, r * out]`` (inputs first); the intermediate then has the smaller width."""
    r, n_out, n_in = blocks.shape
    if n_in <= n_out:
        return blocks.permute(1, 0, 2).reshape(n_out, r * n_in).contiguous()
    return blocks.permute(2, 0, 1).reshape(n_in, r * n_out).contiguous()


def _layer_dots(layer: _Layer, a: Tensor, g: Tensor, acc: torch.dtype) -> Tensor:
    """``sum_t g_t^T S_j a_t`` (weight) plus ``sum_t g_t . b_j`` (bias) for every row ``j``, in
    ``acc``: the large product in the factors' dtype, the contraction after it in ``acc``."""
    size, positions = a.shape[0], a.shape[1]
    r, n_out, n_in = layer.shape
    out: Tensor | None = None
    if layer.flat is not None and positions * r * min(n_in, n_out) > n_in * n_out:
        # Many positions and rows: each example's gradient for this layer is the smaller buffer.
        per_example = (g.transpose(1, 2) @ a).reshape(size, n_out * n_in)
        out = (per_example @ layer.flat.to(a.dtype).T).to(acc)
    elif layer.weight is not None:
        w = layer.weight.to(a.dtype)
        if n_in <= n_out:  # [b, t, r, in], then the inputs
            z = (g.reshape(-1, n_out) @ w).view(size, positions, r, n_in)
            out = torch.einsum("btri,bti->br", z.to(acc), a.to(acc))
        else:  # [b, t, r, out], then the output gradients
            z = (a.reshape(-1, n_in) @ w).view(size, positions, r, n_out)
            out = torch.einsum("btro,bto->br", z.to(acc), g.to(acc))
    if layer.bias is not None:
        bias = g.to(acc).sum(dim=1) @ layer.bias.to(acc).T
        out = bias if out is None else out + bias
    if out is None:
        raise RuntimeError("a layer-wise layer has neither a weight nor a bias chosen")
    return out


def _layer_norms(layer: _Layer, a: Tensor, g: Tensor, acc: torch.dtype) -> Tensor:
    """Squared norms of each example's gradient over the layer's chosen parameters, summed in
    ``acc`` (Gram matrices of many positions in the factors' dtype)."""
    norms = torch.zeros(a.shape[0], dtype=acc, device=a.device)
    if layer.weight is not None:
        _, n_out, n_in = layer.shape
        if a.shape[1] == 1:
            norms = norms + a.square().sum((1, 2), dtype=acc) * g.square().sum((1, 2), dtype=acc)
        elif a.shape[1] ** 2 > n_in * n_out:
            # more positions than weights: each example's gradient is the smaller buffer
            per_example = g.transpose(1, 2) @ a
            norms = norms + per_example.square().sum((1, 2), dtype=acc)
        else:
            grams = (a @ a.transpose(1, 2)).to(acc) * (g @ g.transpose(1, 2)).to(acc)
            norms = norms + grams.sum((1, 2))
    if layer.bias is not None:
        norms = norms + g.sum(dim=1, dtype=acc).square().sum(dim=1)
    return norms
