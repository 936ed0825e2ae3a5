"""Faults a user hits, one test each: the right result, or an error that names the cause, and never
a finished computation lost. Tiny models and a few dozen examples keep every test cheap."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import (
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from torch import Tensor, nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)
from trainers import quick_trainer

from lightning_influence import (
    Exact,
    InfluenceCallback,
    InfluenceError,
    InfluenceResult,
    Ranking,
    RegressionTask,
    TaskError,
    compute_influence,
)
from lightning_influence.callback.checks import (
    check_unsharded,
    check_whole_parameters,
    parameter_shapes,
)

N = 40


class Tiny(L.LightningModule):
    """A linear model trained with the loss ``loss(outputs, targets)``."""

    def __init__(self, d_in: int = 4, d_out: int = 3, loss: Any = F.cross_entropy) -> None:
        super().__init__()
        self.net = nn.Linear(d_in, d_out)
        self.loss = loss

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.loss(self(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self.loss(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _classes(n: int = N, d: int = 4, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=gen), torch.randint(0, 3, (n,), generator=gen))


def _trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> L.Trainer:
    return quick_trainer(tmp_path, callbacks, **{"num_sanity_val_steps": 0, **kwargs})


def _loaders(data: Dataset[Any], batch_size: int = 10) -> tuple[DataLoader[Any], DataLoader[Any]]:
    return DataLoader(data, batch_size=batch_size), DataLoader(data, batch_size=batch_size)


FAST: dict[str, Any] = {"solver": "exact", "damping": 0.1, "perturbation_k": 0, "num_val": 5}


# --- Silent wrong results -------------------------------------------------------------------


def test_mse_regressor_with_the_default_task_gets_regression(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=gen)
    data = TensorDataset(x, x[:, :1] * 2 + 0.1 * torch.randn(N, 1, generator=gen))
    model = Tiny(8, 1, F.mse_loss)
    callback = InfluenceCallback(**FAST, save_dir=str(tmp_path / "out"))
    _trainer(tmp_path, [callback]).fit(model, *_loaders(data))
    result = callback.result
    assert result is not None and result.settings["task"] == "RegressionTask"
    reference = compute_influence(
        model, data, data, task=RegressionTask(), solver=Exact(), damping=0.1,
        val_indices=result.val_indices, progress=False,
    )  # fmt: skip
    assert float(result.scores.abs().max()) > 1e-3  # not the all-zero cross-entropy of one logit
    torch.testing.assert_close(result.scores, reference.scores, rtol=1e-5, atol=1e-7)


def test_a_loss_the_default_task_does_not_compute_fails_before_training(tmp_path: Path) -> None:
    def smoothed(outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, label_smoothing=0.4)

    trainer = _trainer(tmp_path, [InfluenceCallback(**FAST)])
    with pytest.raises(TaskError, match=r"does not compute the loss that `training_step`.*`task=`"):
        trainer.fit(Tiny(loss=smoothed), *_loaders(_classes()))
    assert trainer.global_step == 0


def test_multi_label_targets_with_the_default_task_fail_before_training(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(N, 4, generator=gen), (torch.rand(N, 3, generator=gen) > 0.5))
    data = TensorDataset(data.tensors[0], data.tensors[1].float())  # several labels per example
    trainer = _trainer(tmp_path, [InfluenceCallback(**FAST)])
    with pytest.raises(TaskError, match=r"RegressionTask\(\) or ClassificationTask\(\).*`task=`"):
        trainer.fit(Tiny(loss=F.binary_cross_entropy_with_logits), *_loaders(data))
    assert trainer.global_step == 0


def test_a_regularizer_in_training_step_is_not_a_different_loss(tmp_path: Path) -> None:
    class Decayed(Tiny):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            penalty = sum((p**2).sum() for p in self.parameters())
            return super().training_step(batch, batch_idx) + 0.05 * penalty

    callback = InfluenceCallback(**FAST, save_dir=str(tmp_path / "out"))
    _trainer(tmp_path, [callback]).fit(Decayed(), *_loaders(_classes()))
    assert callback.result is not None
    assert callback.result.settings["task"] == "ClassificationTask"


def test_several_float_targets_are_ambiguous_without_a_task() -> None:
    data = TensorDataset(torch.randn(N, 4), torch.rand(N, 3))
    with pytest.raises(TaskError, match=r"task=RegressionTask\(\)"):
        compute_influence(nn.Linear(4, 3), data, data, solver=Exact(), progress=False)


def test_sampler_subsets_are_respected(tmp_path: Path) -> None:
    data = _classes(50)
    train = DataLoader(data, batch_size=10, sampler=SubsetRandomSampler(range(30)))
    val = DataLoader(data, batch_size=10, sampler=SubsetRandomSampler(range(30, 50)))
    callback = InfluenceCallback(**{**FAST, "num_val": None}, save_dir=str(tmp_path / "out"))
    _trainer(tmp_path, [callback]).fit(Tiny(), train, val)
    assert callback.result is not None
    assert callback.result.train_indices.tolist() == list(range(30))
    assert callback.result.val_indices.tolist() == list(range(30, 50))


def test_a_sampler_that_cannot_be_read_is_refused_before_training(tmp_path: Path) -> None:
    data = _classes()
    weighted = DataLoader(data, batch_size=10, sampler=WeightedRandomSampler([1.0] * N, N))
    trainer = _trainer(tmp_path, [InfluenceCallback(**FAST)])
    with pytest.raises(ValueError, match=r"WeightedRandomSampler.*train_dataset="):
        trainer.fit(Tiny(), weighted, DataLoader(data, batch_size=10))
    assert trainer.global_step == 0


@pytest.mark.parametrize("solver", ["exact", "cg", "lissa"])
def test_a_nan_training_input_is_named_not_blamed_on_damping(solver: str) -> None:
    data = _classes()
    data.tensors[0][7, 2] = math.nan
    with pytest.raises(InfluenceError, match=r"training examples at dataset indices \[7\]"):
        compute_influence(nn.Linear(4, 3), data, _classes(seed=1), solver=solver, progress=False)


def test_nan_weights_are_reported_before_any_solve() -> None:
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.bias[1] = math.inf
    with pytest.raises(InfluenceError, match=r"parameters \['bias'\] hold NaN or Inf"):
        compute_influence(model, _classes(), _classes(), solver=Exact(), progress=False)


@pytest.mark.parametrize("damping", [math.nan, math.inf, -1.0])
def test_a_non_finite_damping_is_refused(damping: float) -> None:
    with pytest.raises(ValueError, match="`damping` must be a finite number >= 0"):
        compute_influence(nn.Linear(4, 3), _classes(), _classes(), damping=damping)


class _Augmented(Dataset[tuple[Tensor, Tensor]]):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.data[i]
        return x + 0.1 * torch.randn_like(x), y


def test_random_augmentation_is_reported(tmp_path: Path) -> None:
    data = _classes()
    callback = InfluenceCallback(**FAST, save_dir=str(tmp_path / "out"))
    train = DataLoader(_Augmented(data), batch_size=10)
    with pytest.warns(UserWarning, match=r"random augmentation.*train_dataset="):
        _trainer(tmp_path, [callback]).fit(Tiny(), train, DataLoader(data, batch_size=10))
    assert callback.result is not None


# --- Finished work thrown away --------------------------------------------------------------


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(20, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens))


def test_token_inputs_skip_perturbation_maps_with_one_warning() -> None:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 20, (N, 5), generator=gen), torch.randint(0, 2, (N,)))
    with pytest.warns(UserWarning, match="not floating-point tensors") as record:
        result = compute_influence(
            _Tokens(), data, data, solver=Exact(), perturbation_k=4, progress=False
        )
    assert len([w for w in record if "floating-point" in str(w.message)]) == 1
    assert result.perturbation is None and result.scores.shape == (N, N)


def test_save_dir_below_a_file_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    trainer = _trainer(tmp_path, [InfluenceCallback(**FAST, save_dir=str(blocker / "influence"))])
    with pytest.raises(ValueError, match=r"a_file is a file, not a folder"):
        trainer.fit(Tiny(), *_loaders(_classes()))
    assert trainer.global_step == 0


class _BlockOutput(Callback):
    """Turns the callback's output folder into a file once training is over."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("in the way")


def test_a_write_error_keeps_the_result_in_memory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    callback = InfluenceCallback(**FAST, save_dir=str(out))
    trainer = _trainer(tmp_path, [_BlockOutput(out), callback])
    with pytest.raises(
        InfluenceError, match=r"could not save the result to .*out.*callback.result"
    ):
        trainer.fit(Tiny(), *_loaders(_classes()))
    assert callback.result is not None and callback.result.scores.shape == (N, 5)
    callback.result.save(tmp_path / "kept.pt")
    assert InfluenceResult.load(tmp_path / "kept.pt").equals(callback.result)


def test_results_are_never_overwritten(tmp_path: Path) -> None:
    first, second = InfluenceCallback(**FAST), InfluenceCallback(**FAST, log_prefix="second")
    trainer = _trainer(tmp_path, [first, second])
    trainer.fit(Tiny(), *_loaders(_classes()))
    assert first.result_path == tmp_path / "influence" / "influence.pt"
    assert second.result_path == tmp_path / "influence_1" / "influence.pt"
    again = InfluenceCallback(**FAST)
    _trainer(tmp_path, [again]).fit(Tiny(), *_loaders(_classes()))
    assert again.result_path == tmp_path / "influence_2" / "influence.pt"
    for callback in (first, second, again):
        assert callback.result is not None and callback.result_path is not None
        assert InfluenceResult.load(callback.result_path).equals(callback.result)


def test_a_run_too_large_for_memory_is_refused_before_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lightning_influence.guards.available_bytes", lambda device: 10_000)
    with pytest.raises(InfluenceError, match=r"would need about .* `parameters=`.*`batch_size`"):
        compute_influence(nn.Linear(4, 3), _classes(), _classes(), solver=Exact(), progress=False)


def test_half_precision_models_are_factorized_in_float32() -> None:
    torch.manual_seed(0)
    model = nn.Linear(64, 10).to(torch.bfloat16)  # 650 parameters: LowRank self-influence
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(60, 64, generator=gen), torch.randint(0, 10, (60,)))
    result = compute_influence(model, data, data, solver="cg", num_val=4, progress=False)
    assert result.settings["dtype"] == "torch.float32"
    assert result.settings["self_influence_solver"]["name"] == "lowrank"
    assert result.self_influence is not None and bool(torch.isfinite(result.self_influence).all())
    assert bool(torch.isfinite(result.scores).all())


class _Scaled(nn.Module):
    """A forward that calls ``.item()``: torch.func.vmap cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) / max(float(x.abs().max().item()), 1.0)


@pytest.mark.parametrize(
    "solver",
    ["exact", "cg", "lissa"],
)
def test_a_model_that_vmap_cannot_trace_falls_back_to_loops(solver: str) -> None:
    data = _classes(30)
    with pytest.warns(UserWarning, match="falling back to a slower loop"):
        result = compute_influence(_Scaled(), data, data, solver=solver, progress=False)
    assert bool(torch.isfinite(result.scores).all()) and result.scores.shape == (30, 30)


# --- Errors that should be the package's own --------------------------------------------------


def test_zero_damping_with_lissa_fails_at_construction() -> None:
    with pytest.raises(ValueError, match=r"`damping` must be > 0 with the LiSSA solver"):
        InfluenceCallback(damping=0.0)
    InfluenceCallback(damping=0.0, solver="cg")  # other solvers accept it


def test_a_loader_without_batching_works_like_its_dataset() -> None:
    data = _classes()
    kwargs: dict[str, Any] = {"solver": Exact(), "damping": 0.1, "progress": False}
    a = compute_influence(nn.Linear(4, 3), DataLoader(data, batch_size=None), data, **kwargs)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    a = compute_influence(model, DataLoader(data, batch_size=None), data, **kwargs)
    b = compute_influence(model, data, data, **kwargs)
    torch.testing.assert_close(a.scores, b.scores)


def test_a_validation_label_out_of_range_is_named() -> None:
    val = _classes(seed=1)
    val.tensors[1][3] = 7
    with pytest.raises(
        TaskError, match=r"validation examples at dataset indices \[3\] have labels"
    ):
        compute_influence(nn.Linear(4, 3), _classes(), val, solver=Exact(), progress=False)


class _LogitsAndProbs(Tiny):
    """A forward that returns ``(logits, probs)``; training uses the logits."""

    def forward(self, x: Tensor) -> Any:
        logits = self.net(x)
        return logits, logits.softmax(-1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0])[0], batch[1])


class _WithMeta(Tiny):
    """Batches ``(x, meta, y)`` and a forward that takes ``(x, meta)``."""

    def __init__(self) -> None:
        super().__init__()
        self.meta = nn.Linear(2, 3)

    def forward(self, x: Tensor, meta: Tensor) -> Tensor:  # type: ignore[override]
        return self.net(x) + self.meta(meta)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0], batch[1]), batch[2])


def test_a_forward_returning_a_tuple_names_task_forward_before_training(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [InfluenceCallback(**FAST)])
    with pytest.raises(
        TaskError, match=r"outputs tuple\(Tensor.*Tensor.*\).*a Task whose `forward` picks it"
    ):
        trainer.fit(_LogitsAndProbs(), *_loaders(_classes()))
    assert trainer.global_step == 0


def test_batches_with_several_inputs_name_task_unpack_before_training(tmp_path: Path) -> None:
    x, y = _classes().tensors
    data = TensorDataset(x, torch.randn(N, 2), y)
    trainer = _trainer(tmp_path, [InfluenceCallback(**FAST)])
    with pytest.raises(
        TaskError,
        match=r"batch of one: list\(Tensor.*, Tensor.*, Tensor.*\)\).*"
        r"missing 1 required positional argument: 'meta'.*`unpack` returns them",
    ):
        trainer.fit(_WithMeta(), *_loaders(data))
    assert trainer.global_step == 0


class StandInDeepSpeedStrategy(SingleDeviceStrategy):
    """A sharding strategy as the callback sees it, on one CPU: once set up, ``net.weight`` is
    marked as a ZeRO-3 partition (``ds_numel``) and ``net.bias`` is left whole."""

    def setup(self, trainer: L.Trainer) -> None:
        super().setup(trainer)
        module: Any = self.lightning_module
        module.net.weight.ds_numel = module.net.weight.numel()


def test_sharded_strategies_are_refused_before_training(tmp_path: Path) -> None:
    stand_in = object.__new__(DeepSpeedStrategy)  # DeepSpeed itself is not installed
    for strategy in (FSDPStrategy(), ModelParallelStrategy(), stand_in):
        with pytest.raises(InfluenceError, match=r"influence_from_checkpoint.*`parameters=`"):
            check_unsharded(strategy, None)
    check_unsharded(SingleDeviceStrategy("cpu"), None)
    shapes = parameter_shapes(Tiny(), ["net.*"])  # before wrapping; then a shard of net.weight
    split = Tiny()
    split.net.weight = nn.Parameter(torch.zeros(1, 4))
    with pytest.raises(InfluenceError, match=r"parameters \['net.weight'\].*are sharded"):
        check_whole_parameters(FSDPStrategy(), split, ["net.*"], shapes)
    check_whole_parameters(FSDPStrategy(), Tiny(), ["net.*"], shapes)  # whole: accepted
    # In a Trainer: all parameters, then a sharded one, refused before the first step.
    for parameters, match in ((None, "splits the model's parameters"), (["net.*"], "net.weight")):
        callback = InfluenceCallback(**FAST, parameters=parameters)
        trainer = _trainer(tmp_path, [callback], strategy=StandInDeepSpeedStrategy("cpu"))
        with pytest.raises(InfluenceError, match=match):
            trainer.fit(Tiny(), *_loaders(_classes()))
        assert trainer.global_step == 0
    # A part the strategy leaves whole: influence over it.
    callback = InfluenceCallback(**FAST, parameters=["net.bias"])
    trainer = _trainer(tmp_path, [callback], strategy=StandInDeepSpeedStrategy("cpu"))
    trainer.fit(Tiny(), *_loaders(_classes()))
    assert callback.result is not None and callback.result.settings["parameters"] == ["net.bias"]


def test_limit_val_batches_zero_says_what_to_pass(tmp_path: Path) -> None:
    data = _classes()
    trainer = _trainer(tmp_path, [InfluenceCallback(**FAST)], limit_val_batches=0)
    with pytest.raises(ValueError, match=r"`limit_val_batches=0`.*`val_dataset=`"):
        trainer.fit(Tiny(), *_loaders(data))


def test_fast_dev_run_skips_influence_and_says_so(tmp_path: Path) -> None:
    callback = InfluenceCallback(**FAST)
    with pytest.warns(UserWarning, match="skipped under `fast_dev_run`"):
        _trainer(tmp_path, [callback], fast_dev_run=True).fit(Tiny(), *_loaders(_classes()))
    assert callback.result is None


def test_a_corrupt_result_file_is_named_as_such(tmp_path: Path) -> None:
    result = compute_influence(
        nn.Linear(4, 3), _classes(), _classes(), solver=Exact(), progress=False
    )
    path = result.save(tmp_path / "influence.pt")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="is not a lightning-influence result file"):
        InfluenceResult.load(path)


def test_changed_settings_are_reported_when_resuming_from_a_checkpoint(tmp_path: Path) -> None:
    data = _classes()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = InfluenceCallback(**FAST, save_dir=str(tmp_path / "a"))
    _trainer(tmp_path, [first, ckpt], enable_checkpointing=True).fit(Tiny(), *_loaders(data))
    resumed = InfluenceCallback(**{**FAST, "damping": 0.5}, save_dir=str(tmp_path / "a"))
    trainer = _trainer(tmp_path, [resumed], max_epochs=2)
    with pytest.warns(UserWarning, match=r"settings \['damping'\] differ"):
        trainer.fit(Tiny(), *_loaders(data), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.restored_settings is not None and resumed.restored_settings["damping"] == 0.1
    assert resumed.result is not None and resumed.result.damping == 0.5


# --- Rough edges ------------------------------------------------------------------------------


def test_rankings_print_readably() -> None:
    result = compute_influence(
        nn.Linear(4, 3), _classes(), _classes(), solver=Exact(), progress=False
    )
    text = repr(result.harmful(k=2))
    assert text.startswith(f"Ranking({N} rows, best first)")
    assert "tensor(" not in text
    first = result.harmful(k=2)
    assert f"row 0: {int(first.indices[0, 0])} (" in text
    assert isinstance(first, Ranking)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        repr(result.outliers(k=3))


# --- Data parallelism (two CPU processes) ------------------------------------------------------

DDP_SCRIPT = Path(__file__).with_name("ddp_faults_run.py")


def _ddp(out: Path, case: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(DDP_SCRIPT), "--out", str(out), "--case", case]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=out)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_self_influence_with_the_default_solver_matches_one_process(tmp_path: Path) -> None:
    from ddp_faults_run import CALLBACK_ARGS, Softmax, make_data

    proc = _ddp(tmp_path, "lowrank")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ddp = InfluenceResult.load(tmp_path / "influence" / "influence.pt")
    assert ddp.settings["self_influence_solver"]["name"] == "lowrank"
    model = Softmax.load_from_checkpoint(tmp_path / "last.ckpt")
    train, val = make_data()
    single = compute_influence(
        model, train, val, **{**CALLBACK_ARGS, "batch_size": 16}, progress=False
    )
    assert ddp.self_influence is not None and single.self_influence is not None
    error = (ddp.self_influence - single.self_influence).abs().max()
    assert float(error / single.self_influence.abs().max()) < 1e-3


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_failure_raises_the_same_influence_error_on_every_process(tmp_path: Path) -> None:
    proc = _ddp(tmp_path, "save_error")
    assert proc.returncode != 0
    errors = [(tmp_path / f"error_rank{r}.txt").read_text() for r in range(2)]
    assert errors[0] == errors[1], errors
    assert "could not save the result to" in errors[0] and "process [0]" in errors[0]


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_a_fault_in_one_shard_fails_every_process_before_any_collective(
    tmp_path: Path,
) -> None:
    proc = _ddp(tmp_path, "bad_label")
    assert proc.returncode != 0
    errors = [(tmp_path / f"error_rank{r}.txt").read_text() for r in range(2)]
    assert errors[0] == errors[1], errors
    assert "process [1]: TaskError: The training examples at dataset indices [1]" in errors[0]
