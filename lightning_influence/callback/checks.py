"""Checks the callback runs before training, so that influence cannot fail or mislead after it.

:func:`settle_task` compares the task's loss with the module's own ``training_step`` loss and
picks :class:`~lightning_influence.RegressionTask` where that is unambiguous;
:func:`check_out_dir` makes sure the result can be written; :func:`warn_if_random` spots random
augmentation in the data influence is computed on; :func:`check_unsharded` and
:func:`check_whole_parameters` refuse parameters that FSDP, DeepSpeed or model parallelism split
into shards.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import (
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    Strategy,
)
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from lightning_influence.compute import evaluation_mode
from lightning_influence.config import InfluenceConfig
from lightning_influence.core.data import IndexedData, as_indexed
from lightning_influence.core.model import FunctionalModel, select_parameters
from lightning_influence.core.task import (
    ClassificationTask,
    RegressionTask,
    Task,
    TaskError,
    ambiguous_task_error,
    describe_structure,
    guess_task,
)
from lightning_influence.errors import InfluenceError

__all__ = [
    "check_before_training",
    "check_out_dir",
    "check_unsharded",
    "check_whole_parameters",
    "fresh_out_dir",
    "parameter_shapes",
    "settle_task",
    "sharded_strategy",
    "training_step_losses",
    "warn_if_random",
]


def check_before_training(
    config: InfluenceConfig, module: L.LightningModule, train: IndexedData, val: IndexedData
) -> Task:
    """Check the data, indices, task and parameter patterns before training; the task to use."""
    val_idx = val.indices[:1]
    if config.val_indices is not None:
        val_idx = config.choose_val(len(as_indexed(val.dataset)))[:1]
    with evaluation_mode(module):
        try:
            task = settle_task(config.task, module, train, config.parameters)
        except TaskError as err:
            found = describe_structure(train.fetch(train.indices[:1])) if len(train) else "none"
            raise TaskError(
                f"InfluenceCallback cannot use the training data (a batch of one: {found}): {err}"
            ) from err
        fm = FunctionalModel(module, task, config.parameters)
        for name, part, idx in (
            ("training", train, train.indices[:1]),
            ("validation", val, val_idx),
        ):
            try:
                fm.check_batch(part.fetch(idx))
            except TaskError as err:
                raise TaskError(f"InfluenceCallback cannot use a {name} batch: {err}") from err
    warn_if_random(train, "training")
    return task


def settle_task(
    task: Task | None,
    module: L.LightningModule,
    train: IndexedData,
    parameters: Sequence[str] | None,
) -> Task:
    """The task to use: ``task`` itself (with a warning when its loss disagrees with
    ``training_step``), else the default task that agrees with ``training_step``.

    Two batches are compared, so a regularizer that ``training_step`` adds to the loss (the same
    on both) does not count as a disagreement; a loss of another shape does.
    """
    half = min(8, len(train) // 2)
    if half == 0:
        return task or ClassificationTask()
    batches = [train.fetch(train.indices[:half]), train.fetch(train.indices[half : 2 * half])]
    steps = training_step_losses(module, batches)
    if task is not None:
        if steps is not None and not _agrees(task, module, parameters, batches, steps):
            warnings.warn(
                f"The loss of `task={type(task).__name__}()` does not follow the loss that "
                "`training_step` returns: influence is computed for the task's loss.",
                stacklevel=3,
            )
        return task
    fm = FunctionalModel(module, ClassificationTask(), parameters)
    prepared = fm.prepare(batches[0])
    with torch.no_grad():
        outputs = fm.outputs(fm.theta, prepared.inputs)
        if not isinstance(outputs, Tensor):  # (logits, probs): an error that says what to pick
            fm.losses_from_outputs(outputs, prepared.targets, prepared.size)
    guess = guess_task(outputs, prepared.targets)
    if steps is None:
        if guess is None:
            raise ambiguous_task_error(outputs, prepared.targets)
        return guess
    candidates = [guess] if guess is not None else [RegressionTask(), ClassificationTask()]
    for candidate in candidates:
        if _agrees(candidate, module, parameters, batches, steps):
            return candidate
    tried = " or ".join(f"{type(c).__name__}()" for c in candidates)
    raise TaskError(
        f"The default task ({tried}) does not compute the loss that `training_step` returns "
        f"({steps[0]:.4g} and {steps[1]:.4g} on two batches), so every score would be wrong. "
        "Pass `task=` a Task whose per-sample loss is the one the model was trained with (e.g. "
        "with label smoothing, class weights or binary cross-entropy); see `Task`."
    )


def training_step_losses(module: L.LightningModule, batches: list[Any]) -> list[float] | None:
    """``training_step``'s loss on each batch, in evaluation mode and without logging; ``None``
    when it cannot be had (manual optimization, no loss returned, or an error)."""
    if not module.automatic_optimization:
        return None
    quiet = {"log": _ignore, "log_dict": _ignore}
    try:
        module.__dict__.update(quiet)
        with evaluation_mode(module), torch.no_grad():
            found = [
                _loss_value(module.training_step(move_data_to_device(b, module.device), i))
                for i, b in enumerate(batches)
            ]
    except Exception:  # the loop calls training_step with more around it; no check then
        return None
    finally:
        for name in quiet:
            module.__dict__.pop(name, None)
    if any(v is None or not math.isfinite(v) for v in found):
        return None
    return [float(v) for v in found if v is not None]


_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)
_WHAT_WORKS = (
    "Train as you do, then compute influence on one device from the checkpoint: "
    "`influence_from_checkpoint(model, datamodule, ckpt_path, trainer_kwargs={'devices': 1})`; "
    "or pass `parameters=` patterns that select a part the strategy leaves whole (a head that "
    "is not sharded, e.g. `parameters=['head.*']`)."
)


def sharded_strategy(strategy: Strategy) -> str | None:
    """The name of ``strategy`` when it shards the module's parameters across processes (FSDP,
    DeepSpeed, model parallelism), else ``None``.

    Example:
        >>> from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy
        >>> sharded_strategy(FSDPStrategy()), sharded_strategy(SingleDeviceStrategy("cpu"))
        ('FSDPStrategy', None)
    """
    name = type(strategy).__name__
    if isinstance(strategy, _SHARDED) or "FSDP" in name or "DeepSpeed" in name:
        return name
    return None


def check_unsharded(strategy: Strategy, parameters: Sequence[str] | None) -> None:
    """Refuse, before training, a strategy that shards the parameters influence would need
    whole: all of them (no ``parameters=``) under FSDP, DeepSpeed or model parallelism.

    Example:
        >>> from lightning.pytorch.strategies import FSDPStrategy
        >>> check_unsharded(FSDPStrategy(), parameters=["head.*"])  # a head may be whole
        >>> try:
        ...     check_unsharded(FSDPStrategy(), parameters=None)
        ... except InfluenceError as err:
        ...     print(str(err)[:63])
        InfluenceCallback cannot compute influence under `FSDPStrategy`
    """
    name = sharded_strategy(strategy)
    if name is not None and parameters is None:
        raise InfluenceError(
            f"InfluenceCallback cannot compute influence under `{name}`: it splits the model's "
            "parameters into shards across processes, and influence needs every selected "
            f"parameter whole on each process. {_WHAT_WORKS}"
        )


Shapes = dict[str, tuple[int, ...]]


def parameter_shapes(module: nn.Module, parameters: Sequence[str] | None) -> Shapes:
    """The shape of each parameter that ``parameters`` selects, before a strategy wraps the
    module (empty when none is selected yet, e.g. before ``configure_model``).

    Example:
        >>> parameter_shapes(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), ["1.*"])
        {'1.weight': (2, 3), '1.bias': (2,)}
    """
    if parameters is None:
        return {}
    named = dict(module.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return {n: tuple(named[n].shape) for n in select_parameters(module, parameters)}
        except ValueError:
            return {}


def check_whole_parameters(
    strategy: Strategy,
    module: nn.Module,
    parameters: Sequence[str] | None,
    shapes: Shapes,
) -> None:
    """Under a sharding strategy, refuse when a selected parameter no longer has the shape it had
    before the strategy wrapped the module (``shapes``, see :func:`parameter_shapes`), was not
    there to be measured, or is a distributed tensor: a shard."""
    name = sharded_strategy(strategy)
    if name is None:
        return
    check_unsharded(strategy, parameters)
    assert parameters is not None
    found = dict(module.named_parameters())
    chosen = parameter_shapes(module, parameters) or shapes
    sharded = [
        n for n in chosen if n not in found or n not in shapes or _split(found[n], shapes[n])
    ]
    if sharded:
        raise InfluenceError(
            f"InfluenceCallback cannot compute influence under `{name}`: the selected parameters "
            f"{sharded[:5]}{' ...' if len(sharded) > 5 else ''} (`parameters={list(parameters)}`)"
            f" are sharded across processes. {_WHAT_WORKS}"
        )


def _split(parameter: Tensor, shape: tuple[int, ...]) -> bool:
    """Whether ``parameter`` is a shard of one of ``shape``: another shape, a distributed tensor
    (FSDP2, tensor parallelism) or a DeepSpeed ZeRO-3 partition."""
    distributed = type(parameter.data).__name__ == "DTensor" or hasattr(parameter, "ds_numel")
    return distributed or tuple(parameter.shape) != shape


def check_out_dir(path: Path) -> None:
    """Fail before training when no result can be written below ``path``."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(
            f"InfluenceCallback cannot write its result below {path}: {probe} is a file, not a "
            "folder. Pass `save_dir=` a folder (it is created if missing)."
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"InfluenceCallback cannot write its result below {path}: {probe} is not writable. "
            "Pass `save_dir=` a writable folder."
        )


def fresh_out_dir(path: Path, filename: str) -> Path:
    """``path`` when it holds no ``filename`` yet, else ``path_1``, ``path_2``, ...: a result is
    never overwritten (two callbacks, ``fit`` twice, runs sharing a folder).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "influence").mkdir(); _ = (root / "influence" / "influence.pt").write_bytes(b"")
        >>> fresh_out_dir(root / "influence", "influence.pt").name
        'influence_1'
    """
    candidate, n = path, 0
    while (candidate / filename).exists():
        n += 1
        candidate = path.with_name(f"{path.name}_{n}")
    return candidate


def warn_if_random(data: IndexedData, which: str) -> None:
    """Warn when reading the same example twice gives different values (random augmentation)."""
    first = data.indices[:1]
    if first.numel() and not _same(data.fetch(first), data.fetch(first)):
        argument = "train_dataset" if which == "training" else "val_dataset"
        warnings.warn(
            f"The {which} data changes between two reads of the same example (random "
            "augmentation?), so influence scores will change from run to run. Pass "
            f"`{argument}=` the same data without augmentation.",
            stacklevel=3,
        )


def _agrees(
    task: Task,
    module: L.LightningModule,
    parameters: Sequence[str] | None,
    batches: list[Any],
    steps: list[float],
) -> bool:
    fm = FunctionalModel(module, task, parameters)
    try:
        means = []
        for batch in batches:
            prepared = fm.prepare(batch)
            with torch.no_grad():
                means.append(float(fm.losses(fm.theta, prepared.inputs, prepared.targets).mean()))
    except (TaskError, RuntimeError, ValueError, IndexError):
        return False
    offsets = [s - m for s, m in zip(steps, means, strict=True)]
    scale = max(abs(steps[0]), abs(steps[1]), 1e-3)
    return abs(offsets[0] - offsets[1]) <= 1e-3 * scale


def _loss_value(out: Any) -> float | None:
    if isinstance(out, Mapping):
        out = out.get("loss")
    if isinstance(out, Tensor) and out.numel() == 1:
        return float(out.detach())
    return None


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return (
            isinstance(b, Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a, b) or (a.is_floating_point() and a.isnan().any()))
        )
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same, a, b))
    try:
        return bool(a == b)
    except Exception:
        return True
