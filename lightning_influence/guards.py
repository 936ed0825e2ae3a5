"""Checks that keep :func:`~lightning_influence.compute_influence` from being silently wrong.

Each either settles a choice the user left open (the task, the working precision) or raises an
:class:`~lightning_influence.InfluenceError` that names the cause before any expensive work:
non-finite weights, a run that will not fit in memory, training examples whose loss is not
finite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor, nn

from lightning_influence.core.data import IndexedData
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.task import (
    ClassificationTask,
    Task,
    TaskError,
    ambiguous_task_error,
    guess_task,
)
from lightning_influence.errors import InfluenceError
from lightning_influence.memory import available_bytes, estimate_bytes, format_bytes
from lightning_influence.solvers import Solver

__all__ = [
    "ExampleScan",
    "bad_examples_named",
    "check_examples_everywhere",
    "check_memory",
    "check_weights",
    "default_task",
    "float_inputs",
    "raise_non_finite",
    "raise_scan",
    "scan_examples",
    "working_dtype",
]

_HALF = (torch.float16, torch.bfloat16)
_NONE = torch.zeros(0, dtype=torch.long)


def working_dtype(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype``, else float32 for a half-precision model (factorizations need it), else the
    model's own (``None``).

    Example:
        >>> working_dtype(torch.nn.Linear(2, 2).bfloat16(), None)
        torch.float32
    """
    if dtype is not None:
        return dtype
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    return torch.float32 if first is not None and first.dtype in _HALF else None


def default_task(
    model: nn.Module,
    train: IndexedData,
    parameters: Sequence[str] | None,
    dtype: torch.dtype | None,
) -> Task:
    """The task for a model given none: by :func:`~lightning_influence.core.task.guess_task` on
    the first training examples; a :class:`TaskError` when the targets are ambiguous."""
    fm = FunctionalModel(model, ClassificationTask(), parameters, dtype)
    prepared = fm.prepare(train.fetch(train.indices[:2]))
    with torch.no_grad():
        outputs = fm.outputs(fm.theta, prepared.inputs)
    task = guess_task(outputs, prepared.targets)
    if task is None:
        raise ambiguous_task_error(outputs, prepared.targets)
    return task


def check_weights(fm: FunctionalModel) -> None:
    """Refuse non-finite chosen parameters (training diverged) before any solve."""
    bad = [
        name
        for name, value in fm.unflatten(fm.theta).items()
        if not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise InfluenceError(
            f"The model's parameters {bad} hold NaN or Inf values: training diverged, and "
            "influence of a diverged model means nothing. Lower the learning rate, clip "
            "gradients, or compute influence from an earlier checkpoint."
        )


def check_memory(fm: FunctionalModel, n_val: int, batch_size: int, solvers: list[Solver]) -> None:
    """Refuse a run whose estimated peak memory exceeds what ``fm``'s device has free."""
    free = available_bytes(fm.device)
    if free is None:
        return
    element = torch.empty(0, dtype=fm.dtype).element_size()
    stages = estimate_bytes(fm.n_params, n_val, batch_size, element, solvers)
    stage, need = max(stages.items(), key=lambda kv: kv[1])
    if need > free:
        raise InfluenceError(
            f"Influence would need about {format_bytes(need)} for the {stage} with "
            f"{fm.n_params:,} parameters, {n_val} validation points and batches of "
            f"{batch_size}, and {fm.device} has {format_bytes(free)} free. Select fewer "
            "parameters with `parameters=` (e.g. the last layer: ['head.*']), lower `num_val` "
            "or `batch_size`, or use solver='cg' / 'lissa' instead of 'exact'."
        )


@dataclass(frozen=True)
class ExampleScan:
    """Training or validation examples that cannot be scored, by dataset index."""

    non_finite: Tensor  # NaN or Inf loss
    bad_labels: Tensor  # integer label outside 0..classes - 1 (cross-entropy's -100 allowed)
    classes: int

    @property
    def count(self) -> int:
        """How many examples are faulty."""
        return int(self.non_finite.numel() + self.bad_labels.numel())


def scan_examples(fm: FunctionalModel, data: IndexedData) -> ExampleScan:
    """One forward pass per batch: which examples have a label out of range or a loss that is
    not finite."""
    non_finite, bad_labels, classes = [_NONE], [_NONE], 0
    for idx, batch in data.batches():
        prepared = fm.prepare(batch)
        targets = prepared.targets
        with torch.no_grad():
            outputs = fm.outputs(fm.theta, prepared.inputs)
            integer = isinstance(targets, Tensor) and not targets.is_floating_point()
            if integer and isinstance(fm.task, ClassificationTask) and isinstance(outputs, Tensor):
                classes = int(outputs.shape[-1])
                outside = ((targets < 0) & (targets != -100)) | (targets >= classes)
                outside = outside.reshape(len(idx), -1).any(dim=1).cpu()
                if bool(outside.any()):
                    bad_labels.append(idx[outside])
                    continue
            losses = fm.losses_from_outputs(outputs, targets, prepared.size)
        non_finite.append(idx[~torch.isfinite(losses.detach().cpu())])
    return ExampleScan(torch.cat(non_finite), torch.cat(bad_labels), classes)


def raise_scan(which: str, scan: ExampleScan, cause: Exception | None = None) -> None:
    """Raise the error for the faulty examples ``scan`` found, if any."""
    if scan.bad_labels.numel():
        raise TaskError(
            f"The {which} examples at dataset indices {scan.bad_labels[:10].tolist()} have "
            f"labels out of range for a model with {scan.classes} outputs (valid labels: "
            f"0..{scan.classes - 1}). Fix the labels or the model's output size."
        ) from cause
    if scan.non_finite.numel():
        raise_non_finite(which, scan.non_finite, cause)


def raise_non_finite(which: str, indices: Tensor, cause: Exception | None = None) -> NoReturn:
    """Name the examples (by dataset index) whose losses or gradients are not finite."""
    shown = indices[:10].tolist()
    more = f" and {indices.numel() - 10} more" if indices.numel() > 10 else ""
    raise InfluenceError(
        f"The {which} examples at dataset indices {shown}{more} have a NaN or Inf loss or "
        "gradient (NaN or Inf in their inputs or targets?); every score would be NaN. Clean or "
        "drop them (e.g. `train_dataset=Subset(...)`); `damping` is not the cause."
    ) from cause


@contextmanager
def bad_examples_named(fm: FunctionalModel, data: IndexedData, which: str) -> Iterator[None]:
    """Name the examples behind a failure: those with a label out of range, or with a
    non-finite loss (which solvers report as a divergence or a failed factorization); the error
    is re-raised as it was when no example is to blame."""
    try:
        yield
    except Exception as err:
        raise_scan(which, scan_examples(fm, data), err)
        raise


def check_examples_everywhere(
    fm: FunctionalModel, train: IndexedData, reduce: Callable[[Tensor], Tensor]
) -> None:
    """Under data parallelism, fail on every process when any process holds a faulty example,
    before the first collective: a process that failed alone would leave the others waiting."""
    scan = scan_examples(fm, train)
    total = int(reduce(torch.tensor([float(scan.count)], device=fm.device)).item())
    raise_scan("training", scan)
    if total:
        raise InfluenceError(
            f"{total} training examples on other processes have labels out of range or a NaN or "
            "Inf loss; their process names them by dataset index."
        )


def float_inputs(fm: FunctionalModel, data: IndexedData) -> bool:
    """Whether the inputs are floating tensors (perturbation maps need a gradient in them)."""
    inputs = fm.prepare(data.fetch(data.indices[:1])).inputs
    return isinstance(inputs, Tensor) and inputs.is_floating_point()
