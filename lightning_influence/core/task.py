"""How a batch becomes a per-sample loss.

A :class:`Task` unpacks a batch into inputs and targets, runs the model and returns one loss per
example. The default, :class:`ClassificationTask`, handles ``(inputs, targets)`` batches (tuple,
list, or dict with obvious keys) and a model trained with cross-entropy. Anything else is one small
subclass away.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ClassificationTask",
    "RegressionTask",
    "Task",
    "TaskError",
    "ambiguous_task_error",
    "describe_structure",
    "guess_task",
]

_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "features", "data")
_TARGET_KEYS = ("y", "target", "targets", "label", "labels")


class TaskError(ValueError):
    """A batch or a loss that the task cannot turn into per-sample losses."""


def describe_structure(obj: Any) -> str:
    """A short account of a batch or an output, for error messages.

    Example:
        >>> import torch
        >>> describe_structure({"x": torch.zeros(2, 3), "y": [1, 2]})
        'dict(x=Tensor(shape=(2, 3), dtype=torch.float32), y=list(int, int))'
    """
    if isinstance(obj, Tensor):
        return f"Tensor(shape={tuple(obj.shape)}, dtype={obj.dtype})"
    if isinstance(obj, Mapping):
        return "dict(" + ", ".join(f"{k}={describe_structure(v)}" for k, v in obj.items()) + ")"
    if isinstance(obj, list | tuple):
        inner = ", ".join(describe_structure(v) for v in obj)
        return f"{type(obj).__name__}({inner})"
    return type(obj).__name__


_HOW_TO = (
    "Pass `task=` a subclass of `lightning_influence.Task` that overrides `unpack(batch)` "
    "(and `forward` / `loss` if needed)."
)


class Task:
    """How to turn a batch into per-sample losses; subclass it for anything non-standard.

    Override :meth:`unpack` for another batch layout, :meth:`forward` for a model with another
    signature or output, and :meth:`loss` for another loss. :meth:`loss` must return one value
    per example (shape ``[batch]``), never a mean.

    Example:
        >>> import torch
        >>> class DictRegression(Task):
        ...     def unpack(self, batch):
        ...         return batch["features"], batch["price"]
        ...     def loss(self, outputs, targets):
        ...         return (outputs.squeeze(-1) - targets) ** 2
        >>> task = DictRegression()
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = task.unpack({"features": torch.zeros(4, 3), "price": torch.ones(4)})
        >>> task.loss(task.forward(model, x), y).shape
        torch.Size([4])
    """

    # examples differentiated at once in per-sample gradients (None: the whole batch)
    chunk_size: int | None = None

    def unpack(self, batch: Any) -> tuple[Any, Any]:
        """Split a batch into ``(inputs, targets)``, each with a leading batch dimension."""
        if isinstance(batch, list | tuple) and len(batch) >= 2:
            return batch[0], batch[1]
        if isinstance(batch, Mapping):
            inputs = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
            targets = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
            if inputs is not None and targets is not None:
                return inputs, targets
            raise TaskError(
                f"Cannot find inputs and targets in a dict batch with keys {sorted(batch)}: "
                f"expected one of {_INPUT_KEYS} and one of {_TARGET_KEYS}. {_HOW_TO}"
            )
        raise TaskError(
            f"Cannot unpack a batch of type {describe_structure(batch)} into (inputs, targets). "
            f"The default task expects a tuple or list `(inputs, targets)` or a dict with "
            f"keys such as 'x'/'y' or 'input'/'target'. {_HOW_TO}"
        )

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """Run the model on the inputs; the default is ``model(inputs)``."""
        return model(inputs)

    def loss(self, outputs: Any, targets: Any) -> Tensor:
        """Per-sample losses, shape ``[batch]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement `loss(outputs, targets)`.")

    def predict(self, outputs: Any) -> Tensor | None:
        """The model's prediction per example (for display), or ``None``."""
        return None

    def batch_size(self, inputs: Any) -> int:
        """Number of examples in ``inputs`` (the leading dimension of its first tensor)."""
        tensor = _first_tensor(inputs)
        if tensor is None or tensor.ndim == 0:
            raise TaskError(
                f"Inputs {describe_structure(inputs)} have no batch dimension. {_HOW_TO}"
            )
        return int(tensor.shape[0])


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    values: Sequence[Any] = ()
    if isinstance(obj, Mapping):
        values = list(obj.values())
    elif isinstance(obj, list | tuple):
        values = obj
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


class ClassificationTask(Task):
    """``(inputs, targets)`` batches and a classifier trained with cross-entropy (the default).

    Example:
        >>> import torch
        >>> task = ClassificationTask()
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> task.loss(logits, torch.tensor([0, 0])).round(decimals=3)
        tensor([0.1270, 2.1270])
    """

    def loss(self, outputs: Any, targets: Any) -> Tensor:
        """Per-sample cross-entropy of the logits."""
        return F.cross_entropy(outputs, targets, reduction="none")

    def predict(self, outputs: Any) -> Tensor | None:
        """The arg-max class."""
        return torch.as_tensor(outputs).argmax(dim=-1)


class RegressionTask(Task):
    """``(inputs, targets)`` batches and a regressor trained with squared error.

    The per-sample loss is the mean squared error over each example's output dimensions.

    Example:
        >>> import torch
        >>> RegressionTask().loss(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]]))
        tensor([1., 4.])
    """

    def loss(self, outputs: Any, targets: Any) -> Tensor:
        """Per-sample mean squared error."""
        diff = (outputs - targets.reshape(outputs.shape)) ** 2
        return diff.reshape(diff.shape[0], -1).mean(dim=1)

    def predict(self, outputs: Any) -> Tensor | None:
        """The model output itself."""
        return torch.as_tensor(outputs)


def guess_task(outputs: Any, targets: Any) -> Task | None:
    """The default task for these outputs and targets, or ``None`` when that is ambiguous.

    Integer targets: :class:`ClassificationTask`. Floating targets with one output per target
    value and one value per example (``[batch]`` or ``[batch, 1]``): :class:`RegressionTask`.
    Floating targets with several values per example could be soft labels, several labels or
    several regression outputs: ``None``, pass ``task=``.

    Example:
        >>> import torch
        >>> type(guess_task(torch.zeros(4, 1), torch.zeros(4, 1))).__name__
        'RegressionTask'
        >>> type(guess_task(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))).__name__
        'ClassificationTask'
        >>> guess_task(torch.zeros(4, 3), torch.zeros(4, 3)) is None
        True
    """
    if not isinstance(targets, Tensor) or not targets.is_floating_point():
        return ClassificationTask()
    if not isinstance(outputs, Tensor) or outputs.ndim == 0 or targets.ndim == 0:
        return None
    per_example = outputs.numel() // max(outputs.shape[0], 1)
    if per_example == 1 and targets.numel() == outputs.numel():
        return RegressionTask()
    return None


def ambiguous_task_error(outputs: Any, targets: Any) -> TaskError:
    """The error for targets the default task cannot interpret on its own."""
    return TaskError(
        "The default task cannot tell how a model with outputs "
        f"{describe_structure(outputs)} was trained on floating targets "
        f"{describe_structure(targets)}: pass `task=RegressionTask()` for squared "
        "error, `task=ClassificationTask()` for cross-entropy with soft labels, or a `Task` "
        "subclass for anything else (e.g. binary cross-entropy for several labels)."
    )
