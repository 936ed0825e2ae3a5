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
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_influence.callback.data import dataset_of, find_data, raise_no_data
from lightning_influence.callback.distributed import gather_result, shard_indices, strategy_reduce
from lightning_influence.compute import compute_influence, evaluation_mode
from lightning_influence.config import InfluenceConfig, check_int
from lightning_influence.core.data import as_indexed
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.task import TaskError
from lightning_influence.errors import explained_failures
from lightning_influence.report import LogSettings, log_influence
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
        self._checked = False

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
        return self._generate_state_key(
            solver=self.solver.name,
            damping=self.config.damping,
            seed=self.config.seed,
            filename=self.filename,
        )

    def settings(self) -> dict[str, Any]:
        """The callback's settings, JSON-serialisable (saved with the result and in checkpoints)."""
        shown = {k: v for k, v in asdict(self.log_settings).items() if k != "describe"}
        return {**self.config.to_dict(), "log": shown, "filename": self.filename}

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
        if stage == self.run_on:
            self._checked = self._check(trainer, pl_module, final=False)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_on == "fit" and not self._checked:
            self._checked = self._check(trainer, pl_module, final=True)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_on == "fit":
            self._run(trainer, pl_module)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.run_on == "validate" and stage == "validate":
            self._run(trainer, pl_module)

    def out_dir(self, trainer: L.Trainer) -> Path:
        """Where the result and the logged files go: ``save_dir``, else ``<log_dir>/influence``.

        Under DDP call it on every process (``trainer.log_dir`` is a collective).
        """
        if self.save_dir:
            return Path(self.save_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "influence"

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> bool:
        """Fail before training on data, indices, patterns or batches that cannot work."""
        train, val = find_data(trainer, pl_module, self.train_dataset, self.val_dataset)
        if train is None or val is None:
            if final:
                raise_no_data(train is None)
            return False
        val_idx = self.config.choose_val(len(as_indexed(val)))
        with evaluation_mode(pl_module):
            fm = FunctionalModel(pl_module, self.config.make_task(), self.config.parameters)
            for name, data, idx in (("training", train, [0]), ("validation", val, val_idx[:1])):
                batch = as_indexed(data).fetch(torch.as_tensor(idx))
                try:
                    fm.check_batch(batch)
                except TaskError as err:
                    raise TaskError(f"InfluenceCallback cannot use a {name} batch: {err}") from err
        return True

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        started = time.perf_counter()
        train, val = find_data(trainer, pl_module, self.train_dataset, self.val_dataset)
        if train is None or val is None:
            raise_no_data(train is None)
        out_dir = self.out_dir(trainer)
        world = trainer.world_size
        shard = shard_indices(torch.arange(len(as_indexed(train))), trainer.global_rank, world)
        device = trainer.strategy.root_device
        with evaluation_mode(pl_module, device), explained_failures(self.config):
            result = compute_influence(
                pl_module,
                train,
                val,
                self.config,
                train_indices=shard,
                progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
                reduce=strategy_reduce(trainer.strategy, world),
            )
        result = gather_result(result, trainer.strategy, world)
        result.settings = {**result.settings, "callback": self.settings()}
        path = out_dir / self.filename
        if trainer.is_global_zero:
            result.diagnostics["time_callback_total"] = time.perf_counter() - started
            result.save(path)
            log_influence(
                result,
                trainer.loggers,
                dataset_of(train),
                dataset_of(val),
                self.config.make_task(),
                out_dir,
                self.log_settings,
                result_path=path,
                step=trainer.global_step,
            )
        trainer.strategy.barrier("influence_saved")
        self.result, self.result_path = result, path
