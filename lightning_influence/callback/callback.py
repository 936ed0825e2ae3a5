"""``InfluenceCallback``: influence of the model a ``Trainer`` has just trained, when fit ends.

The callback only wires the trainer to :func:`~lightning_influence.compute_influence`: it finds
the data (:mod:`~lightning_influence.callback.data`), checks it before training starts, and when
fit ends computes influence on every process (each scoring its shard of the training set),
gathers the result to one :class:`~lightning_influence.InfluenceResult`
(:mod:`~lightning_influence.callback.distributed`), saves it and logs it on rank zero.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_influence.callback.checks import (
    check_before_training,
    check_out_dir,
    check_unsharded,
    check_whole_parameters,
    fresh_out_dir,
    parameter_shapes,
)
from lightning_influence.callback.data import indexed_data
from lightning_influence.callback.distributed import (
    agree_on_failure,
    gather_result,
    shard_indices,
    strategy_reduce,
)
from lightning_influence.callback.saving import save_and_log
from lightning_influence.compute import compute_influence, evaluation_mode
from lightning_influence.config import InfluenceConfig, check_int
from lightning_influence.core.data import IndexedData
from lightning_influence.core.task import Task
from lightning_influence.errors import explained_failures
from lightning_influence.report import LogSettings
from lightning_influence.result import InfluenceResult
from lightning_influence.solvers import Solver

__all__ = ["InfluenceCallback"]

_CONFIG_FIELDS = frozenset(f.name for f in fields(InfluenceConfig))
# the callback's short names for the LogSettings fields
_LOG_NAMES = {"top_k": "top_k", "num_outliers": "n_outliers", "log_val": "n_val"}


class InfluenceCallback(Callback):
    """Computes influence functions for the model once ``trainer.fit`` ends.

    Rows of the result are training examples, columns validation examples, both by dataset index,
    whatever sampler training used. Under DDP every process scores its shard of the training set
    and rank zero saves ``<save_dir>/<filename>`` and logs to the trainer's loggers.

    The computation is set by an :class:`~lightning_influence.InfluenceConfig`, given whole as
    ``config=`` or field by field as keywords (``solver=``, ``damping=``, ``num_val=``, ...; the
    keywords replace the config's fields). Its fields also read as attributes
    (``callback.damping``); ``callback.solver`` is the solver itself.

    Args:
        config: how influence is computed (``InfluenceConfig()`` defaults otherwise).
        log: what the loggers show (:class:`~lightning_influence.report.LogSettings`), kept as
            ``callback.log_settings``.
        train_dataset: training data to use instead of the trainer's (e.g. without augmentation).
        val_dataset: validation data to use instead of the trainer's.
        save_dir: folder for the result file and logged files (``<trainer.log_dir>/influence``).
        filename: name of the saved result file.
        run_on: ``"fit"`` (when fit ends) or ``"validate"`` (when ``trainer.validate`` ends, as
            :func:`~lightning_influence.influence_from_checkpoint` uses it).
        top_k: helpful and harmful training examples shown per validation point (``log.top_k``).
        num_outliers: training examples with the highest self-influence shown
            (``log.n_outliers``).
        log_val: validation points shown in the loggers (``log.n_val``).
        log_prefix: tag prefix in the loggers (``log.prefix``).
        **options: :class:`~lightning_influence.InfluenceConfig` fields.

    Example:
        >>> callback = InfluenceCallback(num_val=16, solver="cg", damping=1e-3, top_k=4)
        >>> callback.solver.name, callback.config.num_val, callback.log_settings.top_k
        ('cg', 16, 4)
    """

    def __init__(
        self,
        config: InfluenceConfig | None = None,
        log: LogSettings | None = None,
        *,
        train_dataset: Dataset[Any] | None = None,
        val_dataset: Dataset[Any] | None = None,
        save_dir: str | None = None,
        filename: str = "influence.pt",
        run_on: Literal["fit", "validate"] = "fit",
        top_k: int | None = None,
        num_outliers: int | None = None,
        log_val: int | None = None,
        log_prefix: str | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            config = InfluenceConfig(**options)
        self.config = replace(config, **options)
        shown = {"top_k": top_k, "num_outliers": num_outliers, "log_val": log_val}
        changes: dict[str, Any] = {_LOG_NAMES[k]: v for k, v in shown.items() if v is not None}
        for name, value in shown.items():
            if value is not None:
                check_int(name, value, 1 if name == "top_k" else 0)
        if log_prefix is not None:
            changes["prefix"] = log_prefix
        self.log_settings = replace(log or LogSettings(), **changes)
        if not filename or Path(filename).name != filename:
            raise ValueError(f"`filename` must be a plain file name, got {filename!r}.")
        if run_on not in ("fit", "validate"):
            raise ValueError(f"`run_on` must be one of ['fit', 'validate'], got {run_on!r}.")
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.save_dir, self.filename, self.run_on = save_dir, filename, run_on
        self.result: InfluenceResult | None = None
        self.result_path: Path | None = None
        self.restored_settings: dict[str, Any] | None = None
        self._checked = self._skip = False
        self._task: Task | None = None
        self._rows: tuple[IndexedData, IndexedData] | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}

    def __getattr__(self, name: str) -> Any:
        config = self.__dict__.get("config")
        if config is not None and name in _CONFIG_FIELDS:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def solver(self) -> Solver:
        """The solver the config names (``config.make_solver()``)."""
        return self.config.make_solver()

    @property
    @override
    def state_key(self) -> str:
        # what it computes influence over and where it writes, never a tunable setting: a resumed
        # run finds its state after a change, and two callbacks (the head alone and all the
        # parameters) live in one Trainer and one checkpoint
        parameters = self.config.parameters
        return self._generate_state_key(
            parameters=None if parameters is None else list(parameters),
            save_dir=self.save_dir,
            filename=self.filename,
            prefix=self.log_settings.prefix,
        )

    def settings(self) -> dict[str, Any]:
        """The callback's settings, JSON-serialisable (saved with the result and in checkpoints)."""
        shown = {k: v for k, v in self.log_settings.to_dict().items() if k != "describe"}
        return {**self._config().to_dict(), "log": shown, "filename": self.filename}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored_settings = dict(state_dict.get("settings", {}))
        changed = sorted(
            k for k, v in self.restored_settings.items() if self.settings().get(k) != v
        )
        if changed:
            warnings.warn(
                f"InfluenceCallback settings {changed} differ from those saved in the checkpoint; "
                "the current ones are used.",
                stacklevel=2,
            )

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != self.run_on:
            return
        self._skip = bool(getattr(trainer, "fast_dev_run", False))
        if self._skip:
            rank_zero_warn(
                "InfluenceCallback is skipped under `fast_dev_run`, which only checks that the "
                "loops run: train without it to compute influence."
            )
            return
        check_unsharded(trainer.strategy, self.config.parameters)
        # measured before the strategy wraps the module, to tell a shard from a whole parameter
        self._shapes = parameter_shapes(pl_module, self.config.parameters)
        self._warn_if_shared_prefix(trainer)
        self._checked = self._check(trainer, pl_module, final=False)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_on == "fit" and not self._skip:
            check_whole_parameters(
                trainer.strategy, pl_module, self.config.parameters, self._shapes
            )
        if self.run_on == "fit" and not self._checked and not self._skip:
            self._checked = self._check(trainer, pl_module, final=True)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_on == "fit" and not self._skip:
            self._run(trainer, pl_module)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.run_on == "validate" and stage == "validate" and not self._skip:
            self._run(trainer, pl_module)

    def out_dir(self, trainer: L.Trainer) -> Path:
        """Where the result and the logged files go: ``save_dir``, else ``<log_dir>/influence``
        (numbered ``_1``, ``_2``, ... when it already holds a result).

        Under DDP call it on every process (``trainer.log_dir`` is a collective).
        """
        if self.save_dir:
            return Path(self.save_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "influence"

    def _warn_if_shared_prefix(self, trainer: L.Trainer) -> None:
        """Warn when another InfluenceCallback of this trainer logs under the same tags."""
        callbacks = getattr(trainer, "callbacks", [])
        found = [c for c in callbacks if isinstance(c, InfluenceCallback)]
        prefix = self.log_settings.prefix
        if trainer.loggers and sum(c.log_settings.prefix == prefix for c in found) > 1:
            rank_zero_warn(
                f"Several InfluenceCallbacks log under the tag prefix {prefix!r}, so their "
                "panels mix in the loggers (each still saves to its own folder). Pass each its "
                "own `log_prefix=` (e.g. 'influence/head')."
            )

    def _config(self) -> InfluenceConfig:
        """The config, with the task settled before training when none was given."""
        return replace(self.config, task=self._task) if self._task else self.config

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> bool:
        """Fail before training on data, indices, tasks, patterns or folders that cannot work."""
        self._rows = indexed_data(trainer, pl_module, self.train_dataset, self.val_dataset, final)
        if self._rows is None:
            return False
        self._task = check_before_training(self.config, pl_module, *self._rows)
        check_out_dir(self.out_dir(trainer))
        return True

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        started = time.perf_counter()
        check_whole_parameters(trainer.strategy, pl_module, self.config.parameters, self._shapes)
        data = self._rows or indexed_data(trainer, pl_module, self.train_dataset, self.val_dataset)
        assert data is not None  # raised when there is none
        train, val = data
        strategy, world = trainer.strategy, trainer.world_size
        out_dir = strategy.broadcast(fresh_out_dir(self.out_dir(trainer), self.filename), src=0)
        shard = shard_indices(train.indices, trainer.global_rank, world)
        config, result, error = self._config(), None, None
        try:
            with evaluation_mode(pl_module, strategy.root_device), explained_failures(config):
                result = compute_influence(
                    pl_module,
                    train,
                    val,
                    config,
                    train_indices=shard,
                    progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
                    reduce=strategy_reduce(strategy, world),
                )
        except Exception as err:  # every process must learn of it, or the others hang
            error = err
        agree_on_failure(strategy, world, error)
        assert result is not None
        self.result = result = gather_result(result, strategy, world)
        result.settings = {**result.settings, "callback": self.settings()}
        path = out_dir / self.filename
        if trainer.is_global_zero:
            result.diagnostics["time_callback_total"] = time.perf_counter() - started
            error = save_and_log(result, path, trainer, train, val, config, self.log_settings)
        agree_on_failure(strategy, world, error)
        self.result_path = path
