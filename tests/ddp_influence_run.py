"""Train the digits CNN with ``InfluenceCallback`` on one or several CPU processes.

Used by ``tests/test_ddp.py``, imported for ``ddp_spawn`` and for the single-process reference
(``tests/ddp_paths_run.py`` covers ``strategy="ddp"``, which re-launches ``sys.argv``); it also
runs as a script. Writes the
influence result to ``<out>/influence.pt`` and the final weights to ``<out>/last.ckpt``.

    python tests/ddp_influence_run.py --out DIR --strategy ddp --devices 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from digits import DigitsCNN, DigitsDataModule

from lightning_influence import InfluenceCallback

# Exact solver: the CNN with 2 channels has 266 parameters, small enough for a quick test.
CALLBACK_ARGS: dict[str, Any] = {
    "solver": "exact",
    "num_val": 12,
    "damping": 1e-3,
    "perturbation_k": 2,
    "seed": 0,
}
N_TRAIN = 151  # odd: the two shards differ in size


def make_data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, n_train=N_TRAIN)


def make_model() -> DigitsCNN:
    return DigitsCNN(channels=2)


def train(out: Path, strategy: str, devices: int) -> InfluenceCallback:
    """Fit two epochs with the callback; the result lands in ``out/influence.pt``."""
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    callback = InfluenceCallback(save_dir=str(out), **CALLBACK_ARGS)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=2,
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0)],
    )
    trainer.fit(make_model(), make_data())
    return callback


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    train(args.out, args.strategy, args.devices)
