"""InfluenceCallback on the digits CNN: results by dataset index, saved and logged, the module left
as it was found, errors before training, failures that leave the run intact, after-the-fact."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from digits import DigitsCNN, DigitsDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from trainers import quick_trainer

from lightning_influence import (
    ClassificationTask,
    InfluenceCallback,
    InfluenceError,
    InfluenceResult,
    LiSSA,
    TaskError,
    influence_from_checkpoint,
)

ARGS: dict[str, Any] = {"solver": "exact", "num_val": 10, "damping": 1e-3, "perturbation_k": 1}


_trainer = quick_trainer


def _expected_val_indices(n: int, k: int, seed: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


@pytest.mark.slow
def test_fit_result_by_dataset_index_saved_logged_and_equal_after_the_fact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    L.seed_everything(0, verbose=False)
    data, model = DigitsDataModule(batch_size=32, n_train=160), DigitsCNN(channels=2)
    callback = InfluenceCallback(**ARGS, top_k=3, log_val=2)
    logger = TensorBoardLogger(tmp_path, name="run")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = _trainer(
        tmp_path, [callback, ckpt], max_epochs=2, logger=logger, enable_checkpointing=True,
        enable_progress_bar=True,
    )  # fmt: skip
    trainer.fit(model, data)
    result = callback.result
    assert result is not None
    assert "ex/s" in capsys.readouterr().err  # the influence bars ran beside Lightning's

    # Rows and columns are dataset indices, and every per-example field matches the datasets.
    n_val = len(data.val_dataset)
    assert result.scores.shape == (160, 10)
    assert torch.equal(result.train_indices, torch.arange(160))
    assert torch.equal(result.val_indices, _expected_val_indices(n_val, 10, seed=0))
    assert torch.equal(result.train_targets, data.train_dataset.tensors[1])
    assert torch.equal(result.val_targets, data.val_dataset.tensors[1][result.val_indices])
    model.eval()
    with torch.no_grad():
        x_val = data.val_dataset.tensors[0][result.val_indices]
        val_losses = F.cross_entropy(model(x_val), result.val_targets, reduction="none")
        train_losses = F.cross_entropy(
            model(data.train_dataset.tensors[0]), data.train_dataset.tensors[1], reduction="none"
        )
    torch.testing.assert_close(result.val_losses, val_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.train_losses, train_losses, rtol=1e-5, atol=1e-6)
    assert result.damping == 1e-3
    assert result.settings["callback"]["solver"]["name"] == "exact"
    assert result.self_influence is not None and bool((result.self_influence > 0).all())
    assert result.perturbation is not None and result.perturbation.shape == (10, 2, 1, 8, 8)

    # Saved in the run's log directory, and it loads back equal.
    path = Path(logger.log_dir) / "influence" / "influence.pt"
    assert callback.result_path == path
    assert InfluenceResult.load(path).equals(result)

    # The trainer's TensorBoard logger received the influence panels.
    events = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert any(tag.startswith("influence") for tag in tags["images"] + tags["tensors"])

    # The callback's settings are in the checkpoint under its state key.
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["callbacks"][callback.state_key]["settings"] == callback.settings()

    # After the fact, from the checkpoint: the same result.
    again = influence_from_checkpoint(
        DigitsCNN(channels=2), data, tmp_path / "ckpt" / "last.ckpt",
        save_dir=str(tmp_path / "after"), top_k=3, log_val=2, **ARGS,
        trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False},
    )  # fmt: skip
    assert torch.equal(again.val_indices, result.val_indices)
    assert torch.equal(again.train_indices, result.train_indices)
    torch.testing.assert_close(again.scores, result.scores, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(again.self_influence, result.self_influence, rtol=1e-5, atol=1e-7)
    assert torch.equal(again.harmful(3).indices, result.harmful(3).indices)
    assert torch.equal(again.outliers(10).indices, result.outliers(10).indices)
    assert InfluenceResult.load(tmp_path / "after" / "influence.pt").equals(again)


class _Recording(ClassificationTask):
    """Records the mode of the model and the grad mode on every forward."""

    def __init__(self) -> None:
        self.seen: set[tuple[bool, bool]] = set()

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        self.seen.add((model.training, torch.is_grad_enabled()))
        return model(inputs)


@pytest.mark.slow
def test_loaders_passed_to_fit_and_module_left_as_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, model = DigitsDataModule(n_train=96), DigitsCNN(channels=2)
    task = _Recording()
    callback = InfluenceCallback(**{**ARGS, "num_val": 4}, task=task)
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(model, DataLoader(data.train_dataset, 32, shuffle=True), data.val_dataloader())
    assert callback.result is not None
    assert torch.equal(callback.result.train_indices, torch.arange(96))
    assert callback.result.val_indices.numel() == 4
    assert "ex/s" not in capsys.readouterr().err  # no influence bars when the trainer has none

    # Run again from a state that differs from what fit leaves: the state comes back untouched.
    model.net[0].requires_grad_(False)
    model.net[3].eval()
    model.net[7].weight.grad = torch.ones_like(model.net[7].weight)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    task.seen.clear()
    callback.on_fit_end(trainer, model)
    assert {training for training, _ in task.seen} == {False}  # computed in evaluation mode
    assert (False, True) in task.seen  # gradients were on where the engine needs them
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(model.net[7].weight.grad, torch.ones_like(model.net[7].weight))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert callback.result.settings["parameters"] == ["net.3.weight", "net.3.bias", "net.7.weight",
                                                      "net.7.bias"]  # fmt: skip


class _TrainOnly(L.LightningDataModule):
    def __init__(self, dataset: Dataset[Any]) -> None:
        super().__init__()
        self.dataset = dataset

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.dataset, batch_size=16)


class _DictBatches(Dataset[dict[str, Tensor]]):
    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x, y = self.base[i]
        return {"pixels": x, "digit": y}


def _small() -> DigitsDataModule:
    return DigitsDataModule(batch_size=16, n_train=48)


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("no_val_data", ValueError, "no validation data"),
        ("no_val_loader_in_fit", ValueError, "no validation data"),
        ("val_index_out_of_range", IndexError, "contains 5000, out of range"),
        ("batch_cannot_unpack", TaskError, "Cannot find inputs and targets.*'digit', 'pixels'"),
        ("patterns_select_nothing", ValueError, r"parameters=\['decoder.\*'\]` selects none"),
    ],
)
def test_bad_input_fails_before_training(
    tmp_path: Path, case: str, error: type[Exception], match: str
) -> None:
    data = _small()
    kwargs: dict[str, Any] = {}
    fit_args: tuple[Any, ...] = (data,)
    if case == "no_val_data":
        fit_args = (_TrainOnly(data.train_dataset),)
    elif case == "no_val_loader_in_fit":
        fit_args = (DataLoader(data.train_dataset, batch_size=16),)
    elif case == "val_index_out_of_range":
        kwargs["val_indices"] = [0, 5000]
    elif case == "batch_cannot_unpack":
        kwargs["train_dataset"] = _DictBatches(data.train_dataset)
    else:
        kwargs["parameters"] = ["decoder.*"]
    model = DigitsCNN(channels=2)
    trainer = _trainer(tmp_path, [InfluenceCallback(**kwargs)], num_sanity_val_steps=0)
    with pytest.raises(error, match=match):
        trainer.fit(model, *fit_args)
    assert trainer.global_step == 0  # no training time was spent


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"solver": "newton"}, "`solver` must be 'lissa', 'cg', 'exact' or a Solver .* 'newton'"),
        ({"damping": -1.0}, "`damping` must be a finite number >= 0, got -1.0"),
        ({"num_val": 0}, "`num_val` must be an integer >= 1 or None, got 0"),
        ({"top_k": 0}, "`top_k` must be an integer >= 1, got 0"),
        ({"val_indices": []}, "`val_indices` must be a non-empty list"),
        ({"filename": "a/b.pt"}, "`filename` must be a plain file name, got 'a/b.pt'"),
        ({"curvature": "fisher"}, "`curvature` must be one of \\['auto', 'gauss_newton'"),
    ],
)  # fmt: skip
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InfluenceCallback(**kwargs)


def test_diverging_solver_names_the_setting_and_leaves_the_run_intact(tmp_path: Path) -> None:
    data, model = _small(), DigitsCNN(channels=2)
    callback = InfluenceCallback(
        solver=LiSSA(preconditioner=None, scale=1e-3, depth=50),
        self_influence=False,
        perturbation_k=0,
        num_val=4,
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _trainer(tmp_path, [callback, ckpt], logger=logger, enable_checkpointing=True)
    with pytest.raises(
        InfluenceError, match=r"lissa solver diverged.*Change `damping` \(it is 0.001\)"
    ):
        trainer.fit(model, data)
    assert trainer.global_step == 3  # training itself finished
    restored = DigitsCNN.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert all(
        torch.equal(a, b) for a, b in zip(restored.parameters(), model.parameters(), strict=True)
    )
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "val/loss" in metrics
    assert callback.result is None
    assert not (Path(logger.log_dir) / "influence").exists()


def test_state_dict_round_trip_and_state_key() -> None:
    callback = InfluenceCallback(solver="cg", damping=0.01, num_val=8, seed=3)
    state = callback.state_dict()
    assert state["settings"]["solver"] == {"name": "cg", "max_iter": 100, "tol": 1e-6}
    assert callback.state_key == (
        "InfluenceCallback{'parameters': None, 'save_dir': None, 'filename': 'influence.pt', "
        "'prefix': 'influence'}"
    )
    same = InfluenceCallback(solver="cg", damping=0.01, num_val=8, seed=3)
    same.load_state_dict(state)
    assert same.restored_settings == callback.settings()
    other = InfluenceCallback(solver="cg", damping=0.1, num_val=8, seed=3)
    with pytest.warns(UserWarning, match=r"settings \['damping'\] differ"):
        other.load_state_dict(state)
    assert other.state_key == callback.state_key  # a changed setting still finds its state
    two = InfluenceCallback(log_prefix="second")
    assert two.state_key != callback.state_key  # two instances can share a checkpoint


class _Headed(L.LightningModule):
    """A body and a head, trained with cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_two_callbacks_run_save_apart_and_each_resumes_its_state(tmp_path: Path) -> None:
    data = TensorDataset(torch.randn(30, 4), torch.randint(0, 3, (30,)))
    loaders = (DataLoader(data, batch_size=10),)  # validation points from `val_dataset`
    fast: dict[str, Any] = {
        "solver": "exact",
        "damping": 0.1,
        "num_val": 4,
        "perturbation_k": 0,
        "val_dataset": data,
    }
    head = InfluenceCallback(**fast, parameters=["head.*"])
    every = InfluenceCallback(**fast)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    logger = CSVLogger(tmp_path, name="run")
    trainer = _trainer(tmp_path, [head, every, ckpt], enable_checkpointing=True, logger=logger)
    with pytest.warns(UserWarning, match="log under the tag prefix 'influence'"):
        trainer.fit(_Headed(), *loaders)  # both log under "influence": said before training
    assert head.result is not None and every.result is not None
    assert head.result.settings["parameters"] == ["head.weight", "head.bias"]
    assert every.result.settings["n_params"] == 5 * 4 + 5 + 3 * 5 + 3
    assert head.result_path is not None and every.result_path is not None
    assert head.result_path.parent != every.result_path.parent  # a folder each
    assert head.result_path.exists() and every.result_path.exists()
    # Resumed with another damping each: each finds its own state by what tells them apart.
    head2 = InfluenceCallback(**dict(fast, damping=0.2), parameters=["head.*"])
    every2 = InfluenceCallback(**dict(fast, damping=0.3))
    with pytest.warns(UserWarning, match=r"settings \['damping'\] differ"):
        _trainer(tmp_path, [every2, head2], max_epochs=2).fit(
            _Headed(), *loaders, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )
    assert head2.restored_settings is not None and every2.restored_settings is not None
    assert head2.restored_settings["parameters"] == ["head.*"]
    assert every2.restored_settings["parameters"] is None
    assert head2.result is not None and head2.result.settings["parameters"] == [
        "head.weight",
        "head.bias",
    ]


def test_out_of_memory_names_the_settings_and_restores_the_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(model: nn.Module, *args: Any, **kwargs: Any) -> None:
        model.eval()  # fail half-way, with the module changed
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("lightning_influence.callback.callback.compute_influence", out_of_memory)
    data, model = _small(), DigitsCNN(channels=2)
    model.net[3].requires_grad_(False)
    callback = InfluenceCallback(batch_size=16, num_val=4, parameters=["net.7.*"])
    trainer = _trainer(tmp_path, [callback])
    with pytest.raises(InfluenceError, match=r"out of memory.*Lower `batch_size` \(it is 16\)"):
        trainer.fit(model, data)
    assert trainer.global_step == 3
    assert all(m.training for m in model.modules())  # as fit left it
    assert [p.requires_grad for p in model.net[3].parameters()] == [False, False]


@pytest.mark.slow
def test_example_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from digits_influence import main

    runs = tmp_path / "runs"
    result = main(["--epochs", "1", "--num-val", "8", "--quiet", "--runs", str(runs)])
    out = capsys.readouterr().out
    log_dir = runs / "digits_influence" / "version_0"
    assert f"TensorBoard logs:  {log_dir.resolve()}" in out
    command = f"{sys.executable} -m tensorboard.main --logdir {runs.resolve()}"
    assert f"Open them with:    {command}" in out  # works as typed, outside the environment too
    assert "most helpful:" in out and "Highest self-influence:" in out
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert InfluenceResult.load(log_dir / "influence" / "influence.pt").equals(result)
    assert result.scores.shape == (1200, 8)
