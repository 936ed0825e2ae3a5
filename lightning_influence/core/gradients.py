"""Per-sample gradients of the loss over the chosen parameters.

The fast path is ``torch.func``: ``vmap`` over ``grad`` of a one-example loss. A model that cannot
be vmapped (an in-place op on a batched tensor, data-dependent control flow, ...) falls back,
with one warning, to a loop of batch-size-1 backward passes that gives the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.task import TaskError

__all__ = ["PerSampleGradients", "one_example", "per_sample_gradients", "rows_of"]


def rows_of(tree: Any, index: int | slice | Tensor) -> Any:
    """``t[index]`` for every tensor of a batch ``tree`` (other leaves and 0-d tensors as they
    are): one example, a range of them, or those at a tensor of positions.

    Example:
        >>> import torch
        >>> rows_of({"x": torch.arange(6).view(3, 2), "k": 4}, slice(1, 3))
        {'x': tensor([[2, 3],
                [4, 5]]), 'k': 4}
    """
    return tree_map(lambda t: t[index] if isinstance(t, Tensor) and t.ndim else t, tree)


def one_example(tree: Any, i: int | None = None) -> Any:
    """Example ``i`` of a batch (or, with no ``i``, one unbatched example) as a batch of one."""
    if i is None:
        return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, tree)
    return rows_of(tree, slice(i, i + 1))


class PerSampleGradients:
    """Per-sample gradients of one model's loss over its chosen parameters, ``[batch, p]``.

    The first batch that ``vmap`` cannot handle switches the model's per-sample gradients to the
    loop (``model.routes``), with one warning; :attr:`vectorized` says which path is taken.

    Example:
        >>> import torch
        >>> from lightning_influence.core.model import FunctionalModel
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> gradients = PerSampleGradients(fm)
        >>> gradients(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])).shape, gradients.vectorized
        (torch.Size([5, 15]), True)
    """

    def __init__(self, model: FunctionalModel) -> None:
        self.model = model

    @property
    def vectorized(self) -> bool:
        """Whether gradients come from ``vmap`` (else from the loop)."""
        return self.model.routes.get("per_sample_gradients") is None

    def __call__(self, inputs: Any, targets: Any) -> Tensor:
        """Gradients for a batch already cast by :meth:`FunctionalModel.prepare`."""
        model = self.model
        if not self.vectorized:
            return _loop_gradients(model, inputs, targets)

        def loss_one(th: Tensor, x: Any, y: Any) -> Tensor:
            return model.losses(th, one_example(x), one_example(y))[0]

        try:
            with torch.enable_grad():
                # A task may bound how many examples are differentiated at once (activations).
                chunk = model.task.chunk_size
                return vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk)(
                    model.theta, inputs, targets
                )
        except TaskError:
            raise
        except (RuntimeError, ValueError, NotImplementedError) as err:
            if isinstance(err, torch.OutOfMemoryError):
                raise
            model.routes.fall_back("per_sample_gradients", "loop", err)
            return _loop_gradients(model, inputs, targets)


def per_sample_gradients(model: FunctionalModel, inputs: Any, targets: Any) -> Tensor:
    """Gradients of each example's loss w.r.t. ``model.theta``, shape ``[batch, p]``.

    Inputs and targets must already be cast (see :meth:`FunctionalModel.prepare`). For many
    batches, keep one :class:`PerSampleGradients` so a failed ``vmap`` is tried only once.

    Example:
        >>> import torch
        >>> from lightning_influence.core.model import FunctionalModel
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> per_sample_gradients(fm, torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])).shape
        torch.Size([5, 15])
    """
    return PerSampleGradients(model)(inputs, targets)


def _loop_gradients(model: FunctionalModel, inputs: Any, targets: Any) -> Tensor:
    n = model.task.batch_size(inputs)
    rows = []
    with torch.enable_grad():
        for i in range(n):
            theta = model.theta.detach().requires_grad_(True)
            loss = model.losses(theta, one_example(inputs, i), one_example(targets, i)).sum()
            rows.append(torch.autograd.grad(loss, theta)[0])
    return torch.stack(rows)
