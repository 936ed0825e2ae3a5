"""The chosen parameters grouped by linear layer, the blocks Kronecker factors approximate.

A :class:`KroneckerLayer` is one ``nn.Linear`` (or a linear layer whose weight is stored
``[in, out]``, GPT-2's ``Conv1D``) seen as one matrix ``[out, in_ext]``: the weight, then the
bias as a last column. It says where that matrix lies in the flat parameter vector, cuts a block
of vectors into per-layer matrices and writes them back, and holds the layer's eigenvalue-corrected
factors once :mod:`.kronecker` has computed them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_influence.core.model import FunctionalModel

__all__ = ["KroneckerLayer", "kronecker_layers"]


@dataclass
class KroneckerLayer:
    """One layer's chosen parameters as a matrix ``[out, in_ext]`` (the weight, then the bias as
    a last column), where they lie in ``theta``, and its factors once computed.

    Example:
        >>> layer = KroneckerLayer("fc", slice(0, 6), slice(6, 8), n_out=2, n_in=3)
        >>> layer.blocks(torch.arange(8.0)[None]).tolist()
        [[[0.0, 1.0, 2.0, 6.0], [3.0, 4.0, 5.0, 7.0]]]
    """

    name: str
    weight: slice | None
    bias: slice | None
    n_out: int
    n_in: int
    transposed: bool = False  # weight stored [in, out] (GPT-2's Conv1D)
    a_basis: Tensor = field(default_factory=lambda: torch.zeros(0))  # Q_A [in_ext, in_ext]
    g_basis: Tensor = field(default_factory=lambda: torch.zeros(0))  # Q_G [out, out]
    eigenvalues: Tensor = field(default_factory=lambda: torch.zeros(0))  # [out, in_ext]

    @property
    def n_in_ext(self) -> int:
        """Columns of the layer's matrix: inputs, plus one for a chosen bias."""
        return (self.n_in if self.weight is not None else 0) + (self.bias is not None)

    def blocks(self, vectors: Tensor) -> Tensor:
        """Each row of ``vectors`` ``[m, p]`` restricted to this layer, as ``[m, out, in_ext]``."""
        m, parts = vectors.shape[0], []
        if self.weight is not None:
            w = vectors[:, self.weight]
            parts.append(
                w.reshape(m, self.n_in, self.n_out).transpose(1, 2)
                if self.transposed
                else w.reshape(m, self.n_out, self.n_in)
            )
        if self.bias is not None:
            parts.append(vectors[:, self.bias].reshape(m, self.n_out, 1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def place(self, blocks: Tensor, into: Tensor) -> None:
        """Write ``blocks`` ``[m, out, in_ext]`` back into this layer's columns of ``into``."""
        m = blocks.shape[0]
        if self.weight is not None:
            w = blocks[:, :, : self.n_in]
            into[:, self.weight] = (w.transpose(1, 2) if self.transposed else w).reshape(m, -1)
        if self.bias is not None:
            into[:, self.bias] = blocks[:, :, -1]


def _conv1d(module: nn.Module) -> bool:
    """A linear layer with its weight stored ``[in, out]`` (Hugging Face's GPT-2 ``Conv1D``)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, Tensor)
        and weight.ndim == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def kronecker_layers(model: FunctionalModel) -> tuple[list[KroneckerLayer], list[str]]:
    """The chosen parameters grouped by layer (``nn.Linear``, or a ``Conv1D`` whose weight is
    stored ``[in, out]``, each parameter used by that module only), and the names of the chosen
    parameters no layer covers.

    Example:
        >>> from lightning_influence.core.task import ClassificationTask
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
        >>> layers, rest = kronecker_layers(FunctionalModel(net, ClassificationTask()))
        >>> [(layer.name, layer.n_out, layer.n_in_ext) for layer in layers], rest
        ([('0', 3, 5)], ['1.weight', '1.bias'])
    """
    owners: dict[int, int] = {}
    for _, p in model.model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    named = dict(model.model.named_parameters())
    layers: dict[str, KroneckerLayer] = {}
    rest: list[str] = []
    start = 0
    for name, numel in zip(model.names, model.numels, strict=True):
        span, start = slice(start, start + numel), start + numel
        module_name, _, leaf = name.rpartition(".")
        module = model.model.get_submodule(module_name)
        conv1d = _conv1d(module)
        linear = type(module) is nn.Linear or conv1d
        if not linear or leaf not in ("weight", "bias") or owners[id(named[name])] != 1:
            rest.append(name)
            continue
        rows, columns = module.get_parameter("weight").shape
        n_out, n_in = (columns, rows) if conv1d else (rows, columns)
        layer = layers.setdefault(
            module_name, KroneckerLayer(module_name, None, None, int(n_out), int(n_in), conv1d)
        )
        setattr(layer, leaf, span)
    return list(layers.values()), rest
