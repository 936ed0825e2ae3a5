"""``InfluenceCallback``: influence of the model a ``Trainer`` has just trained, when fit ends.

The callback only wires the trainer to :func:`~lightning_influence.compute_influence`: it finds
the data, checks it before training starts, and when fit ends computes influence on every process
(each scoring its shard of the training set), gathers the result to one
:class:`~lightning_influence.InfluenceResult`, saves it and logs it on rank zero.
:func:`influence_from_checkpoint` runs the same work on a trained model through
``trainer.validate``, without retraining.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NoReturn

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_influence.callback.distributed import gather_result, shard_indices, strategy_reduce
from lightning_influence.compute import compute_influence
from lightning_influence.core.curvature import CurvatureKind
from lightning_influence.core.data import as_indexed
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.task import ClassificationTask, Task, TaskError
from lightning_influence.report import LogSettings, log_influence
from lightning_influence.result import InfluenceResult
from lightning_influence.solvers import (
    CG,
    Exact,
    FactorizedSolver,
    LiSSA,
    Solver,
    SolverDivergedError,
)

__all__ = ["InfluenceCallback", "InfluenceError", "influence_from_checkpoint"]

SolverName = Literal["lissa", "cg", "exact"]
Data = Dataset[Any] | DataLoader[Any]
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class InfluenceError(RuntimeError):
    """Influence could not be computed after training; the training run itself is intact."""


class InfluenceCallback(Callback):
    """Computes influence functions for the model once ``trainer.fit`` ends.

    Rows of the result are training examples, columns validation examples, both by dataset index,
    whatever sampler training used. Under DDP every process scores its shard of the training set
    and rank zero saves ``<save_dir>/<filename>`` and logs to the trainer's loggers.

    Args:
        num_val: validation points scored, drawn with ``seed`` (all of them when the set has no
            more than this, or when ``None``).
        val_indices: explicit validation dataset indices; overrides ``num_val``.
        top_k: helpful and harmful training examples shown per validation point.
        solver: ``"lissa"``, ``"cg"``, ``"exact"`` or a configured :class:`Solver`.
        damping: the ``lambda`` of ``H + lambda I``; the weight decay the model was trained with
            reproduces its objective's curvature.
        parameters: shell-style patterns of parameter names to use (all trainable by default).
        task: how a batch becomes per-sample losses (``ClassificationTask()`` by default).
        curvature: ``"gauss_newton"`` or ``"hessian"``.
        self_influence: also compute self-influence (suspected mislabels, outliers).
        self_influence_solver: a factorizing solver for self-influence (by default ``LowRank()``,
            or ``Exact()`` for at most 512 parameters).
        num_outliers: training examples with the highest self-influence shown.
        perturbation_k: per validation point, input-space influence maps of its top-k helpful and
            harmful training examples (0 turns them off).
        train_dataset: training data to use instead of the trainer's (e.g. without augmentation).
        val_dataset: validation data to use instead of the trainer's.
        save_dir: folder for the result file and logged files (``<trainer.log_dir>/influence``).
        filename: name of the saved result file.
        seed: seeds the choice of validation points and the stochastic solver.
        batch_size: examples per batch for gradients and curvature (the loader's by default).
        dtype: working precision (``"float64"`` for reference runs); the model's by default.
        log_val: validation points shown in the loggers.
        log_prefix: tag prefix in the loggers.
        run_on: ``"fit"`` (when fit ends) or ``"validate"`` (when ``trainer.validate`` ends, as
            :func:`influence_from_checkpoint` uses it).

    Example:
        >>> callback = InfluenceCallback(num_val=16, solver="cg", damping=1e-3)
        >>> callback.solver.name
        'cg'
    """

    def __init__(
        self,
        num_val: int | None = 64,
        val_indices: list[int] | None = None,
        top_k: int = 8,
        solver: SolverName | Solver = "lissa",
        damping: float = 1e-3,
        parameters: list[str] | None = None,
        task: Task | None = None,
        curvature: CurvatureKind = "gauss_newton",
        self_influence: bool = True,
        self_influence_solver: FactorizedSolver | None = None,
        num_outliers: int = 32,
        perturbation_k: int = 4,
        train_dataset: Dataset[Any] | None = None,
        val_dataset: Dataset[Any] | None = None,
        save_dir: str | None = None,
        filename: str = "influence.pt",
        seed: int = 0,
        batch_size: int | None = None,
        dtype: Literal["float32", "float64"] | None = None,
        log_val: int = 8,
        log_prefix: str = "influence",
        run_on: Literal["fit", "validate"] = "fit",
    ) -> None:
        _check_int("num_val", num_val, 1, allow_none=True)
        _check_int("top_k", top_k, 1)
        _check_int("num_outliers", num_outliers, 0)
        _check_int("perturbation_k", perturbation_k, 0)
        _check_int("batch_size", batch_size, 1, allow_none=True)
        _check_int("log_val", log_val, 0)
        _check_choice("curvature", curvature, ("gauss_newton", "hessian"))
        _check_choice("dtype", dtype, (None, *_DTYPES))
        _check_choice("run_on", run_on, ("fit", "validate"))
        if not damping >= 0 or damping == float("inf"):
            raise ValueError(f"`damping` must be a finite number >= 0, got {damping!r}.")
        if val_indices is not None and (
            len(val_indices) == 0 or any(not isinstance(i, int) or i < 0 for i in val_indices)
        ):
            raise ValueError(
                "`val_indices` must be a non-empty list of dataset indices >= 0, "
                f"got {val_indices!r}."
            )
        if not filename or Path(filename).name != filename:
            raise ValueError(f"`filename` must be a plain file name, got {filename!r}.")
        self.solver = _make_solver(solver, seed)
        self.num_val, self.val_indices, self.top_k = num_val, val_indices, top_k
        self.damping, self.curvature, self.task = damping, curvature, task
        self.parameters = [parameters] if isinstance(parameters, str) else parameters
        self.self_influence, self.self_influence_solver = self_influence, self_influence_solver
        self.num_outliers, self.perturbation_k = num_outliers, perturbation_k
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.save_dir, self.filename = save_dir, filename
        self.seed, self.batch_size, self.dtype = seed, batch_size, dtype
        self.log_val, self.log_prefix, self.run_on = log_val, log_prefix, run_on
        self.result: InfluenceResult | None = None
        self.result_path: Path | None = None
        self.restored_settings: dict[str, Any] | None = None
        self._checked = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            solver=self.solver.name, damping=self.damping, seed=self.seed, filename=self.filename
        )

    def settings(self) -> dict[str, Any]:
        """The callback's settings, JSON-serialisable (saved with the result and in checkpoints)."""
        return {
            "num_val": self.num_val,
            "val_indices": self.val_indices,
            "top_k": self.top_k,
            "solver": self.solver.settings(),
            "damping": self.damping,
            "parameters": self.parameters,
            "task": type(self.task or ClassificationTask()).__name__,
            "curvature": self.curvature,
            "self_influence": self.self_influence,
            "num_outliers": self.num_outliers,
            "perturbation_k": self.perturbation_k,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "filename": self.filename,
        }

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
        train, val = _find_data(trainer, pl_module, self.train_dataset, self.val_dataset)
        if train is None or val is None:
            if final:
                _raise_no_data(train is None)
            return False
        val_idx = self._choose_val(val)
        with _prepared(pl_module, device=None):
            fm = FunctionalModel(pl_module, self.task or ClassificationTask(), self.parameters)
            for name, data, idx in (("training", train, [0]), ("validation", val, val_idx[:1])):
                batch = as_indexed(data).fetch(torch.as_tensor(idx))
                try:
                    fm.check_batch(batch)
                except TaskError as err:
                    raise TaskError(f"InfluenceCallback cannot use a {name} batch: {err}") from err
        return True

    def _choose_val(self, val: Data) -> torch.Tensor:
        n = len(as_indexed(val))
        if n == 0:
            raise ValueError(
                "The validation dataset is empty: InfluenceCallback needs validation points."
            )
        if self.val_indices is not None:
            idx = torch.tensor(self.val_indices)
            if int(idx.max()) >= n:
                raise IndexError(
                    f"`val_indices` contains {int(idx.max())}, out of range for a validation set "
                    f"of {n} examples (valid: 0..{n - 1})."
                )
            return idx
        if self.num_val is None or n <= self.num_val:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=generator)[: self.num_val].sort().values

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        started = time.perf_counter()
        train, val = _find_data(trainer, pl_module, self.train_dataset, self.val_dataset)
        if train is None or val is None:
            _raise_no_data(train is None)
        out_dir = self.out_dir(trainer)
        world = trainer.world_size
        shard = shard_indices(torch.arange(len(as_indexed(train))), trainer.global_rank, world)
        with _prepared(pl_module, trainer.strategy.root_device), _explained_failures(self):
            result = compute_influence(
                pl_module,
                train,
                val,
                solver=self.solver,
                damping=self.damping,
                task=self.task,
                parameters=self.parameters,
                curvature=self.curvature,
                self_influence=self.self_influence,
                self_influence_solver=self.self_influence_solver,
                train_indices=shard,
                val_indices=self._choose_val(val),
                batch_size=self.batch_size,
                dtype=_DTYPES[self.dtype] if self.dtype else None,
                perturbation_k=self.perturbation_k,
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
                _dataset(train),
                _dataset(val),
                self.task or ClassificationTask(),
                out_dir,
                LogSettings(
                    n_val=self.log_val,
                    top_k=self.top_k,
                    n_outliers=self.num_outliers,
                    prefix=self.log_prefix,
                ),
                result_path=path,
                step=trainer.global_step,
            )
        trainer.strategy.barrier("influence_saved")
        self.result, self.result_path = result, path


def influence_from_checkpoint(
    model: L.LightningModule,
    datamodule: L.LightningDataModule | None = None,
    ckpt_path: str | Path | None = None,
    *,
    trainer_kwargs: Mapping[str, Any] | None = None,
    **callback_args: Any,
) -> InfluenceResult:
    """Influence for an already trained model, without retraining: the callback's work, once.

    Runs :class:`InfluenceCallback` (with ``callback_args``) through ``trainer.validate(model,
    datamodule, ckpt_path=ckpt_path)``, so the weights come from the checkpoint, the same data,
    settings, DDP and loggers apply, and the result equals what the callback gave at the end of
    fit. Without a datamodule, pass ``train_dataset=`` and ``val_dataset=``.

    Args:
        model: the LightningModule (its weights are replaced by the checkpoint's when given).
        datamodule: the data the model was trained on.
        ckpt_path: a checkpoint written by Lightning; ``None`` uses the model as it is.
        trainer_kwargs: ``Trainer`` arguments (devices, strategy, logger, default_root_dir, where
            ``<log_dir>/influence/`` is saved). One device, no logger by default.
        **callback_args: :class:`InfluenceCallback` arguments.

    Returns:
        The :class:`~lightning_influence.InfluenceResult`, also saved as the callback saves it.

    Example:
        >>> import torch, lightning as L, tempfile
        >>> from torch.utils.data import TensorDataset
        >>> class Tiny(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(3, 2)
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def validation_step(self, batch, batch_idx):
        ...         pass
        >>> data = TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
        >>> result = influence_from_checkpoint(
        ...     Tiny(), train_dataset=data, val_dataset=data, solver="exact", damping=0.1,
        ...     perturbation_k=0, save_dir=tempfile.mkdtemp(),
        ...     trainer_kwargs={"enable_progress_bar": False})
        >>> result.scores.shape
        torch.Size([20, 20])
    """
    callback = InfluenceCallback(**{**callback_args, "run_on": "validate"})
    kwargs: dict[str, Any] = {
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        **(trainer_kwargs or {}),
    }
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), callback]
    trainer = L.Trainer(**kwargs)
    loaders = None
    if datamodule is None and callback.val_dataset is not None:
        loaders = DataLoader(callback.val_dataset, batch_size=callback.batch_size or 64)
    trainer.validate(model, loaders, ckpt_path=ckpt_path, datamodule=datamodule, verbose=False)
    if callback.result is not None:
        return callback.result
    # ddp_spawn: computed in the worker processes, which saved it
    path = callback.out_dir(trainer) / callback.filename
    if not path.exists():  # pragma: no cover
        raise InfluenceError(f"The validate run finished without an influence result at {path}.")
    return InfluenceResult.load(path)


def _make_solver(solver: SolverName | Solver, seed: int) -> Solver:
    if isinstance(solver, Solver):
        return solver
    if solver == "lissa":
        return LiSSA(seed=seed)
    if solver == "cg":
        return CG()
    if solver == "exact":
        return Exact()
    raise ValueError(
        f"`solver` must be 'lissa', 'cg', 'exact' or a Solver instance, got {solver!r}."
    )


def _check_int(name: str, value: int | None, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be an integer >= {low}{extra}, got {value!r}.")


def _check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def _raise_no_data(no_train: bool) -> NoReturn:
    which = "training" if no_train else "validation"
    hook = "train_dataloader" if which == "training" else "val_dataloader"
    override = "train_dataset" if which == "training" else "val_dataset"
    raise ValueError(
        f"InfluenceCallback found no {which} data: give the Trainer a `{hook}` (in the "
        f"datamodule, the LightningModule or `trainer.fit`) or pass `{override}=` to the callback."
    )


def _find_data(
    trainer: L.Trainer, module: L.LightningModule, train: Data | None, val: Data | None
) -> tuple[Data | None, Data | None]:
    """The callback's datasets, else the trainer's loaders, else the datamodule's or module's."""

    def first(loaders: Any) -> Data | None:
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        if isinstance(loaders, list | tuple):
            loaders = loaders[0] if loaders else None
        return loaders

    def hooked(name: str) -> Data | None:
        for owner in (getattr(trainer, "datamodule", None), module):
            if owner is not None and is_overridden(name, owner):
                return first(getattr(owner, name)())
        return None

    # `is None`, not truthiness: `bool()` of a dataset or loader asks for its length
    if train is None:
        train = first(trainer.train_dataloader)
    if train is None:
        train = hooked("train_dataloader")
    if val is None:
        val = first(trainer.val_dataloaders)
    if val is None:
        val = hooked("val_dataloader")
    return train, val


def _dataset(data: Data) -> Dataset[Any]:
    return data.dataset if isinstance(data, DataLoader) else data


@contextmanager
def _prepared(module: nn.Module, device: torch.device | None) -> Iterator[None]:
    """Evaluation mode, grad enabled, on ``device``; the module's state is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    places = [(t, t.device) for t in (*module.parameters(), *module.buffers())]
    try:
        if device is not None:
            module.to(device)
        module.eval()
        with torch.enable_grad():
            yield
    finally:
        devices = {dev for _, dev in places}
        if len(devices) == 1:
            module.to(devices.pop())
        else:
            for tensor, dev in places:
                tensor.data = tensor.data.to(dev)
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _explained_failures(callback: InfluenceCallback) -> Iterator[None]:
    """Turn a solver divergence or an out-of-memory error into an error that says what to change."""
    intact = "Training finished and its checkpoints and logs are intact; only influence failed."
    try:
        yield
    except SolverDivergedError as err:
        raise InfluenceError(
            f"InfluenceCallback: the {callback.solver.name} solver diverged: {err} {intact} "
            f"Change `damping` (it is {callback.damping:g}), the LiSSA `scale`, or use "
            "solver='cg' or 'exact'."
        ) from err
    except (torch.OutOfMemoryError, MemoryError) as err:
        raise InfluenceError(
            f"InfluenceCallback ran out of memory: {err} {intact} Lower `batch_size` (it is "
            f"{callback.batch_size}), `num_val` (it is {callback.num_val}), or select fewer "
            "parameters with `parameters=` (e.g. the last layer); with `self_influence=True` the "
            "default Exact self-influence solver needs a p x p matrix."
        ) from err
