"""InfluenceCallback configured from LightningCLI: YAML, ``--trainer.callbacks+=``, bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from digits import DigitsCNN, DigitsDataModule
from lightning.pytorch.cli import LightningCLI

from lightning_influence import CG, InfluenceCallback, InfluenceResult

CONFIG = """\
trainer:
  max_epochs: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_influence.InfluenceCallback
      init_args:
        solver: {solver}
        damping: 0.01
        val_indices: [3, 1, 4]
        parameters: ["net.7.*"]
        self_influence: false
        perturbation_k: 0
model:
  channels: 2
data:
  n_train: 48
  batch_size: 16
"""


def _callback(cli: LightningCLI) -> InfluenceCallback:
    found = [c for c in cli.trainer.callbacks if isinstance(c, InfluenceCallback)]
    assert len(found) == 1
    return found[0]


def _config(tmp_path: Path, solver: str) -> str:
    path = tmp_path / "cfg" / "influence.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(CONFIG.format(solver=solver))
    return str(path)


def test_yaml_config(tmp_path: Path) -> None:
    cli = LightningCLI(
        DigitsCNN, DigitsDataModule, run=False, args=["--config", _config(tmp_path, "exact")]
    )
    callback = _callback(cli)
    assert callback.solver.name == "exact"
    assert callback.damping == 0.01
    assert callback.val_indices == [3, 1, 4]
    assert callback.parameters == ["net.7.*"]
    assert callback.self_influence is False


def test_solver_object_from_the_command_line(tmp_path: Path) -> None:
    args = [
        "--trainer.callbacks+=lightning_influence.InfluenceCallback",
        "--trainer.callbacks.solver=lightning_influence.CG",
        "--trainer.callbacks.solver.max_iter=7",
        "--trainer.callbacks.num_val=5",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    callback = _callback(LightningCLI(DigitsCNN, DigitsDataModule, run=False, args=args))
    assert callback.solver == CG(max_iter=7)
    assert callback.num_val == 5


def test_bad_value_fails_with_lightning_cli_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        LightningCLI(
            DigitsCNN, DigitsDataModule, run=False, args=["--config", _config(tmp_path, "newton")]
        )
    err = capsys.readouterr().err
    assert 'Parser key "solver"' in err
    assert "Expected a typing.Literal['lissa', 'cg', 'exact']" in err
    assert "Given value: newton" in err


def test_value_rejected_by_the_callback(tmp_path: Path) -> None:
    config = _config(tmp_path, "cg")
    Path(config).write_text(Path(config).read_text().replace("damping: 0.01", "damping: -0.5"))
    with pytest.raises(ValueError, match=r"`damping` must be a finite number >= 0, got -0\.5"):
        LightningCLI(DigitsCNN, DigitsDataModule, run=False, args=["--config", config])


@pytest.mark.slow
def test_fit_from_the_cli_saves_the_result(tmp_path: Path) -> None:
    args = ["fit", "--config", _config(tmp_path, "exact"), f"--trainer.default_root_dir={tmp_path}"]
    cli = LightningCLI(DigitsCNN, DigitsDataModule, args=args)
    callback = _callback(cli)
    assert callback.result_path == tmp_path / "influence" / "influence.pt"
    saved = InfluenceResult.load(callback.result_path)
    assert torch.equal(saved.val_indices, torch.tensor([3, 1, 4]))
    assert saved.scores.shape == (48, 3)
    assert saved.settings["parameters"] == ["net.7.weight", "net.7.bias"]
    assert saved.settings["callback"]["damping"] == 0.01
