"""Which parameters count, and the model as a function of one flat parameter vector.

Influence is computed over a chosen set of trainable parameters, all of them by default. The
chosen parameters are flattened into one vector ``theta`` so that every later stage (gradients,
curvature products, solvers) works with plain ``[p]`` vectors and ``[m, p]`` blocks.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from lightning_influence.core.attention import differentiable_attention
from lightning_influence.core.routes import Routes
from lightning_influence.core.task import Task, TaskError, describe_structure

__all__ = ["Batch", "FunctionalModel", "select_parameters"]


def select_parameters(model: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """Names of the trainable parameters that match any of ``patterns`` (all when ``None``).

    Patterns are shell-style (``fnmatch``) and matched against ``model.named_parameters()``
    names. Frozen parameters (``requires_grad=False``) are never selected; one that a pattern
    names is reported in a warning.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        >>> select_parameters(model, ["1.*"])
        ['1.weight', '1.bias']
    """
    named = list(model.named_parameters())
    if patterns is None:
        chosen = [name for name, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("The model has no trainable parameters (requires_grad is False).")
        return chosen
    if isinstance(patterns, str):
        patterns = [patterns]
    matched = [name for name, _ in named if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)]
    frozen = {name for name, p in named if not p.requires_grad}
    skipped = [name for name in matched if name in frozen]
    if skipped:
        warnings.warn(
            f"Parameters {skipped} match `parameters={list(patterns)}` but are frozen "
            "(requires_grad=False); they are left out of the influence computation.",
            stacklevel=2,
        )
    chosen = [name for name in matched if name not in frozen]
    if not chosen:
        available = [name for name, p in named if p.requires_grad]
        raise ValueError(
            f"`parameters={list(patterns)}` selects none of the model's trainable parameters. "
            f"Trainable parameters are: {available[:20]}{' ...' if len(available) > 20 else ''}."
        )
    return chosen


class FunctionalModel:
    """A model and a task as pure functions of a flat parameter vector ``theta``.

    Everything the model holds that is not chosen (other parameters, buffers) stays fixed at its
    current value, converted to ``dtype``. The model itself is never modified.

    Example:
        >>> import torch
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> fm.theta.shape
        torch.Size([15])
        >>> fm.losses(fm.theta, torch.zeros(2, 4), torch.tensor([0, 1])).shape
        torch.Size([2])
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        parameters: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.task = task
        self.names = select_parameters(model, parameters)
        named = dict(model.named_parameters())
        dtype = dtype or named[self.names[0]].dtype
        self.dtype = dtype
        self.device = named[self.names[0]].device
        chosen = [named[n].detach().to(dtype) for n in self.names]
        self.shapes = [p.shape for p in chosen]
        self.numels = [p.numel() for p in chosen]
        self.theta = torch.cat([p.reshape(-1) for p in chosen])
        chosen_names = set(self.names)
        self.fixed: dict[str, Tensor] = {
            name: t.detach().to(dtype) if t.is_floating_point() else t.detach()
            for name, t in [*model.named_parameters(), *model.named_buffers()]
            if name not in chosen_names
        }
        self._forward = _TaskForward(model, task)
        # where torch.func refuses this model, the plain-autograd route each stage took instead
        self.routes = Routes()

    @property
    def n_params(self) -> int:
        """Length of ``theta``."""
        return int(self.theta.numel())

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into named parameter tensors."""
        pieces = torch.split(theta, self.numels)
        return {n: t.view(s) for n, t, s in zip(self.names, pieces, self.shapes, strict=True)}

    def cast(self, data: Any) -> Any:
        """Move a batch to the model's device, floating tensors to the working dtype."""

        def move(t: Any) -> Any:
            if not isinstance(t, Tensor):
                return t
            t = t.to(self.device, non_blocking=True)
            return t.to(self.dtype) if t.is_floating_point() else t

        return tree_map(move, data)

    def outputs(self, theta: Tensor, inputs: Any) -> Any:
        """Model outputs with parameters ``theta``."""
        state = {**self.fixed, **self.unflatten(theta)}
        with differentiable_attention():  # built-in transformer layers, differentiable
            return functional_call(self._forward, _prefixed(state), (inputs,), strict=False)

    def losses_from_outputs(self, outputs: Any, targets: Any, size: int | None = None) -> Tensor:
        """Per-sample losses from outputs, checked to be one per example (``size`` of them)."""
        try:
            loss = self.task.loss(outputs, targets)
        except TypeError as err:
            raise _loss_type_error(self.task, outputs, targets, err) from err
        if not isinstance(loss, Tensor) or loss.ndim != 1 or size not in (None, loss.shape[0]):
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            examples = f" for a batch of {size} examples" if size is not None else ""
            raise TaskError(
                f"The task's loss returned {shape}{examples}; it must return one loss per "
                "example, shape [batch] (use reduction='none', not a mean). Override `Task.loss` "
                "to fix it."
            )
        return loss

    def losses(self, theta: Tensor, inputs: Any, targets: Any) -> Tensor:
        """Per-sample losses ``[batch]`` with parameters ``theta``."""
        return self.losses_from_outputs(self.outputs(theta, inputs), targets)

    def prepare(self, batch: Any) -> Batch:
        """Unpack a collated batch with the task and cast it, once, for every later use."""
        inputs, targets = self.task.unpack(batch)
        inputs, targets = self.cast(inputs), self.cast(targets)
        return Batch(inputs, targets, self.task.batch_size(inputs))

    def check_batch(self, batch: Any) -> tuple[Any, Any, int]:
        """Unpack and cast a batch; verify, with one forward pass, that the loss is per-sample."""
        prepared = self.prepare(batch)
        with torch.no_grad():
            outputs = self.outputs(self.theta, prepared.inputs)
            self.losses_from_outputs(outputs, prepared.targets, prepared.size)
        return prepared.inputs, prepared.targets, prepared.size


@dataclass(frozen=True)
class Batch:
    """A batch unpacked by the task and cast to the model's device and dtype."""

    inputs: Any
    targets: Any
    size: int


def _prefixed(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"model.{k}": v for k, v in state.items()}


class _TaskForward(nn.Module):
    """Wraps ``task.forward(model, inputs)`` so that ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self._task = task

    def forward(self, inputs: Any) -> Any:
        try:
            return self._task.forward(self.model, inputs)
        except TypeError as err:
            raise _forward_type_error(self._task, inputs, err) from err


def _forward_type_error(task: Task, inputs: Any, err: TypeError) -> TaskError:
    """A ``TypeError`` from the forward pass, explained: the inputs the task unpacked, and how a
    task passes several inputs to a forward that takes them."""
    return TaskError(
        f"The model's forward failed on the inputs {describe_structure(inputs)} that "
        f"`{type(task).__name__}.unpack` took from a batch: TypeError: {err}. The default task "
        "calls `model(inputs)` with the first element of each batch. For a forward that takes "
        "several inputs (batches `(x, meta, y)` and `forward(self, x, meta)`), pass `task=` a "
        "Task whose `unpack` returns them together and whose `forward` passes them on: "
        "`def unpack(self, batch): return (batch[0], batch[1]), batch[2]` and "
        "`def forward(self, model, inputs): return model(*inputs)`."
    )


def _loss_type_error(task: Task, outputs: Any, targets: Any, err: TypeError) -> TaskError:
    """A ``TypeError`` from the task's loss, explained: the outputs it was given, and, for a
    forward that returns several outputs, how a task picks the logits."""
    found = f"outputs {describe_structure(outputs)} and targets {describe_structure(targets)}"
    if isinstance(outputs, tuple | list | dict):
        fix = (
            "The model's forward returns several outputs; the loss needs the one it was trained "
            "on. Pass `task=` a Task whose `forward` picks it, e.g. "
            "`def forward(self, model, inputs): return model(inputs)[0]` for `(logits, probs)`."
        )
    else:
        fix = "Pass `task=` a Task whose `loss(outputs, targets)` takes these."
    return TaskError(
        f"`{type(task).__name__}.loss` failed on the model's {found}: TypeError: {err}. {fix}"
    )
