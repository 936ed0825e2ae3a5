"""Faults under DDP on two CPU processes, for ``tests/test_faults.py``.

``--case lowrank``: a 650-parameter model with the default self-influence solver (``LowRank``,
Nystrom, Gauss-Newton curvature); the result lands in ``<out>/influence/influence.pt`` and the
final weights in ``<out>/last.ckpt``. ``--case save_error``: the output folder turns into a file
after training, so rank zero cannot save; ``--case bad_label``: the data influence is computed on
has a label out of range in the second process's shard only. In both failing cases every process
records the error it raised in ``<out>/error_rank<r>.txt``.

    python tests/ddp_faults_run.py --out DIR --case lowrank
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceCallback, InfluenceError

N_TRAIN, N_VAL = 121, 30  # odd: the two shards differ in size
CALLBACK_ARGS: dict[str, Any] = {"solver": "cg", "damping": 1e-2, "num_val": 6, "perturbation_k": 0}


class Softmax(L.LightningModule):
    """Softmax regression on 64 features: 650 parameters, above the Exact self-influence limit."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_data() -> tuple[TensorDataset, TensorDataset]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, 64, generator=gen)
    y = (x[:, :10] + 0.5 * torch.randn(N_TRAIN + N_VAL, 10, generator=gen)).argmax(dim=1)
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


class _BlockOutput(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("in the way")
        trainer.strategy.barrier("blocked")


class _Recording(InfluenceCallback):
    """Writes the error each process raised before raising it (no process may be killed first)."""

    def __init__(self, out: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            super().on_fit_end(trainer, pl_module)
        except InfluenceError as err:
            (self.out / f"error_rank{trainer.global_rank}.txt").write_text(str(err))
            trainer.strategy.barrier("recorded")
            raise


def run(out: Path, case: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    train, val = make_data()
    extra: dict[str, Any] = {}
    if case == "bad_label":  # index 1: only in the second process's shard
        labels = train.tensors[1].clone()
        labels[1] = 99
        extra["train_dataset"] = TensorDataset(train.tensors[0], labels)
    influence = _Recording(out, save_dir=str(out / "influence"), **CALLBACK_ARGS, **extra)
    callbacks: list[Callback] = [influence, ModelCheckpoint(dirpath=out, save_last=True)]
    if case == "save_error":
        callbacks.insert(0, _BlockOutput(out / "influence"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(Softmax(), DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--case", choices=["lowrank", "save_error", "bad_label"], required=True)
    args = parser.parse_args()
    run(args.out, args.case)
