"""Gauss-Newton products of one batch from per-layer factors, as batched matrix products: a
measured alternative to the package's forward-and-reverse products, not used by it (it does not
pay: see ``layerwise_products.py --factors`` and docs/benchmarks.md).

For a layer ``z = W a + b`` (``nn.Linear`` with any leading dimensions, ``nn.Conv2d`` through
its unfolded patches) the model's outputs depend on ``W`` only through ``z``, so with ``G`` the
Jacobian of an example's ``k`` outputs with respect to the layer's outputs (``[k, positions,
out]``) and ``a`` its inputs:

* ``J v = sum_layers sum_t G_t (V a_t + c)`` for the layer's block ``(V, c)`` of a vector;
* ``J^T u = (sum_t g_t a_t^T, sum_t g_t)`` with ``g_t = G_t^T u``.

One forward pass captures every covered layer's inputs and outputs (the hooks of
:mod:`.layerwise`), ``k`` reverse passes (vmapped) give the ``G`` of all layers at once, and
each block of vectors then costs two matrix products per layer, about a forward and a weight
gradient, instead of a forward-mode pass and a reverse pass through the whole model. Parameters
of other layers take per-example Jacobians of those parameters alone. Worth it where ``k`` is
small against the vectors (classifiers) and ``k`` times the layers' outputs fit in memory; on
the 1M MLP the ``k`` Jacobians (``k`` times the hidden activations) make both the factors and
the products bound by memory traffic.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.core.layerwise import _factors, capture_layers, layerwise_parameters
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.products import example_jacobians, output_hessians

__all__ = ["LayerFactors", "LayerProducts"]


@dataclass
class _Layer:
    module: nn.Module
    weight: slice | None = None  # columns of theta
    bias: slice | None = None
    shape: tuple[int, int] = (0, 0)  # (out, in)
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


@dataclass
class LayerFactors:
    """One batch's factors: per covered layer and call, the inputs ``[B, T, in]`` and the output
    Jacobians ``[B, k, T * out]``; the other parameters' per-example Jacobians ``[B, k, p_rest]``
    (``None`` without any); the output-loss Hessians ``[B, k, k]``."""

    calls: list[tuple[_Layer, Tensor, Tensor]]
    rest: Tensor | None
    hessians: Tensor


class LayerProducts:
    """``sum_b J_b^T H_b J_b V`` for a batch, from per-layer factors (see the module docstring).

    Covers ``nn.Linear`` and ``nn.Conv2d`` (one group, zero padding given as sizes) weights and
    biases used by their own module only; every other chosen parameter takes per-example
    Jacobians of the outputs (``rest_numel`` of them).

    Example:
        >>> import torch
        >>> from lightning_influence.core.task import ClassificationTask
        >>> from lightning_influence.core.model import FunctionalModel
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> fm = FunctionalModel(net.double(), ClassificationTask())
        >>> x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
        >>> lp = LayerProducts(fm)
        >>> v = torch.randn(2, fm.n_params, dtype=torch.float64)
        >>> from lightning_influence.core.products import gauss_newton_by_jacobians
        >>> reference = gauss_newton_by_jacobians(fm, x, y, net(x).detach(), v)
        >>> torch.allclose(lp.products(lp.factors(x, y), v), reference)
        True
    """

    def __init__(self, model: FunctionalModel) -> None:
        self.model = model
        covered = layerwise_parameters(model)
        layers: dict[str, _Layer] = {}
        rest_names: list[str] = []
        rest_columns: list[Tensor] = []
        offset = 0
        for name, shape, numel, ok in zip(
            model.names, model.shapes, model.numels, covered, strict=True
        ):
            columns = slice(offset, offset + numel)
            offset += numel
            module_name, _, leaf = name.rpartition(".")
            module = model.model.get_submodule(module_name)
            if not ok or isinstance(module, nn.Embedding):
                rest_names.append(name)
                rest_columns.append(torch.arange(columns.start, columns.stop))
                continue
            layer = layers.setdefault(module_name, _Layer(module))
            if leaf == "weight":
                layer.weight, layer.shape = columns, (shape[0], math.prod(shape[1:]))
            else:
                layer.bias = columns
                if layer.weight is None:
                    layer.shape = (numel, 0)
        self._layers = list(layers.values())
        self._rest: FunctionalModel | None = None
        self._rest_columns: Tensor | None = None
        if rest_names:
            self._rest = FunctionalModel(model.model, model.task, rest_names, dtype=model.dtype)
            self._rest_columns = torch.cat(rest_columns).to(model.device)

    @property
    def covers_any(self) -> bool:
        """Whether at least one chosen parameter takes the layer-wise route."""
        return bool(self._layers)

    @property
    def rest_numel(self) -> int:
        """Chosen parameters outside the covered layers (per-example Jacobians)."""
        return 0 if self._rest_columns is None else int(self._rest_columns.numel())

    def factors(self, inputs: Any, targets: Any) -> LayerFactors:
        """One forward pass with the layers' hooks and ``k`` reverse passes of the outputs."""
        fm = self.model
        for layer in self._layers:
            layer.inputs.clear()
            layer.outputs.clear()
        with torch.enable_grad(), self._hooks():
            theta = fm.theta.detach().requires_grad_(True)  # for a graph through every layer
            out = fm.outputs(theta, inputs)
        if not isinstance(out, Tensor) or out.ndim == 0:
            raise RuntimeError("layer-wise products need the outputs as one batch-first tensor")
        size = out.shape[0]
        flat = out.reshape(size, -1)
        k = flat.shape[1]
        captured = [z for layer in self._layers for z in layer.outputs]
        units = torch.eye(k, dtype=flat.dtype, device=flat.device)[:, None, :].expand(k, size, k)
        grads = _output_gradients(flat, captured, units)  # each [k, *z.shape]
        calls = []
        position = iter(grads)
        for layer in self._layers:
            for a_in in layer.inputs:
                g = next(position)
                if g is None:
                    continue
                a, _ = _factors(layer.module, a_in, g[0], size)
                if isinstance(layer.module, nn.Conv2d):
                    g = g.flatten(3).transpose(2, 3)  # [k, B, positions, out]
                jac = g.reshape(k, size, -1).transpose(0, 1).contiguous()  # [B, k, T * out]
                calls.append((layer, a.detach(), jac))
            layer.inputs.clear()
            layer.outputs.clear()
        rest = None
        if self._rest is not None:
            rest = example_jacobians(self._rest, inputs).detach()
        hessians = output_hessians(fm, targets, out.detach()).detach()
        return LayerFactors(calls, rest, hessians)

    def products(self, factors: LayerFactors, vectors: Tensor) -> Tensor:
        """``sum_b J_b^T H_b J_b v`` for each row of ``vectors`` ``[m, p]``."""
        m = vectors.shape[0]
        batch, k, _ = factors.hessians.shape
        jv = torch.zeros(batch, k, m, dtype=vectors.dtype, device=vectors.device)
        for layer, a, jac in factors.calls:
            jv += torch.bmm(jac, _tangent(layer, a, vectors))
        rest_v = None
        if factors.rest is not None and self._rest_columns is not None:
            rest_v = vectors[:, self._rest_columns]
            jv += torch.einsum("bkp,mp->bkm", factors.rest, rest_v)
        u = torch.bmm(factors.hessians, jv)  # [B, k, m]
        result = torch.zeros_like(vectors)
        for layer, a, jac in factors.calls:
            out, n_in = layer.shape
            g = torch.bmm(jac.transpose(1, 2), u).view(batch, -1, out, m)  # [B, T, out, m]
            if layer.weight is not None:
                grad_w = g.reshape(-1, out * m).T @ a.reshape(-1, n_in)  # [out * m, in]
                result[:, layer.weight] += grad_w.view(out, m, n_in).transpose(0, 1).reshape(m, -1)
            if layer.bias is not None:
                result[:, layer.bias] += g.sum((0, 1)).T
        if factors.rest is not None and self._rest_columns is not None:
            result[:, self._rest_columns] += torch.einsum("bkp,bkm->mp", factors.rest, u)
        return result

    def factor_bytes(self, inputs: Any) -> int:
        """Bytes of one example's output Jacobians at the covered layers' outputs and of its
        other parameters' Jacobians, measured with one example (hooks, no reverse pass)."""
        fm = self.model
        for layer in self._layers:
            layer.inputs.clear()
            layer.outputs.clear()
        from lightning_influence.core.gradients import rows_of

        with torch.no_grad(), self._hooks():
            out = fm.outputs(fm.theta, rows_of(inputs, slice(0, 1)))
        k = out[0].numel() if isinstance(out, Tensor) and out.ndim else 0
        outputs = sum(z.numel() for layer in self._layers for z in layer.outputs)
        for layer in self._layers:
            layer.inputs.clear()
            layer.outputs.clear()
        return k * (outputs + self.rest_numel) * fm.theta.element_size()

    def _hooks(self) -> AbstractContextManager[None]:
        return capture_layers(self._layers)


def _output_gradients(flat: Tensor, captured: list[Tensor], units: Tensor) -> list[Tensor | None]:
    """The gradients of each output coordinate (all examples at once) with respect to the
    captured layer outputs, ``[k, *z.shape]`` each: one vmapped reverse pass, or one per output
    where the backward pass cannot be vmapped."""
    try:
        return list(
            torch.autograd.grad(
                flat, captured, units, retain_graph=True, is_grads_batched=True, allow_unused=True
            )
        )
    except RuntimeError:
        rows = [
            torch.autograd.grad(flat, captured, u, retain_graph=True, allow_unused=True)
            for u in units
        ]
        return [
            None if parts[0] is None else torch.stack(parts) for parts in zip(*rows, strict=True)
        ]


def _tangent(layer: _Layer, a: Tensor, vectors: Tensor) -> Tensor:
    """The layer's output change ``V a_t + c`` for each vector, as ``[B, T * out, m]``."""
    m = vectors.shape[0]
    batch, positions, _ = a.shape
    if layer.weight is not None:
        out, n_in = layer.shape
        w = vectors[:, layer.weight].reshape(m * out, n_in)
        z = (a.reshape(-1, n_in) @ w.T).view(batch, positions, m, out)
        if layer.bias is not None:
            z = z + vectors[:, layer.bias]
        return z.permute(0, 1, 3, 2).reshape(batch, -1, m)
    assert layer.bias is not None
    c = vectors[:, layer.bias].T  # [out, m]
    return c.expand(batch, positions, *c.shape).reshape(batch, -1, m)
