"""Find flipped labels by self-influence, fix them, retrain (Koh & Liang's experiment, on digits).

1. Flip 10% of the training labels of scikit-learn's digits (fixed seed).
2. Train the small CNN with Lightning and ``InfluenceCallback``: when fit ends it computes the
   self-influence of every training example with the scalable ``LowRank`` solver.
3. Review the ranking: how many flips sit in its top 10% and top 20%?
4. Relabel the flagged examples that really were flipped (what a reviewer would fix), retrain,
   and compare validation accuracy of the clean, noisy and repaired models.

    python examples/mislabel_review.py                      # random flips
    python examples/mislabel_review.py --flip-mode confusable
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import DigitsCNN, DigitsDataModule

from lightning_influence import (
    InfluenceCallback,
    InfluenceResult,
    LowRank,
    detection_metrics,
)

WEIGHT_DECAY = 1e-3


def train(
    datamodule: DigitsDataModule, epochs: int, seed: int, callback: InfluenceCallback | None = None
) -> tuple[DigitsCNN, float]:
    """Fit a fresh CNN; returns it with its validation accuracy."""
    L.seed_everything(seed, verbose=False)
    model = DigitsCNN(weight_decay=WEIGHT_DECAY)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback] if callback is not None else [],
        default_root_dir=tempfile.mkdtemp(prefix="mislabel_review_"),
    )
    trainer.fit(model, datamodule=datamodule)
    metrics = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    return model, float(metrics["val/acc"])


def review(
    result: InfluenceResult, datamodule: DigitsDataModule, fractions: tuple[float, ...]
) -> None:
    """Print the flips found at each checked fraction and the first suspects."""
    assert result.self_influence is not None
    n = len(result.train_indices)
    bad = torch.isin(result.train_indices, datamodule.flipped)
    print(f"{int(bad.sum())} of {n} training labels were flipped.")
    for f in fractions:
        top = result.outliers(round(f * n)).indices
        found = int(torch.isin(top, datamodule.flipped).sum())
        print(f"  top {f:.0%} of the self-influence ranking ({len(top)} examples): {found} flips")
    metrics = detection_metrics(result.self_influence, bad, fractions)
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    solver = result.settings["self_influence_solver"]
    print(f"  self-influence solver: {solver}")
    print("  first suspects (dataset index, given label, predicted label, flipped?):")
    position = {int(i): k for k, i in enumerate(result.train_indices)}
    flipped = set(datamodule.flipped.tolist())
    for i in result.outliers(8).indices.tolist():
        k = position[i]
        given = None if result.train_targets is None else int(result.train_targets[k])
        pred = None if result.train_predictions is None else int(result.train_predictions[k])
        print(f"    {i:5d}  {given}  {pred}  {i in flipped}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flip-mode", choices=["random", "confusable"], default="random")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--fraction", type=float, default=0.2, help="share of the ranking reviewed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    mode: Literal["random", "confusable"] = args.flip_mode

    noisy = DigitsDataModule(flip_fraction=0.1, flip_mode=mode, seed=args.seed)
    callback = InfluenceCallback(
        num_val=16,
        solver=LowRank(),
        self_influence_solver=LowRank(),
        damping=WEIGHT_DECAY,  # the CNN's L2 penalty: the curvature of its own objective
        perturbation_k=0,
        num_outliers=round(args.fraction * len(noisy.train_dataset)),
        seed=args.seed,
    )
    _, acc_noisy = train(noisy, args.epochs, args.seed, callback)
    result = callback.result
    assert result is not None and result.self_influence is not None
    review(result, noisy, (0.1, 0.2))

    # A reviewer checks the top `fraction` and fixes the labels that are really wrong.
    flagged = result.outliers(round(args.fraction * len(result.train_indices))).indices
    fixed = flagged[torch.isin(flagged, noisy.flipped)]
    images, labels = noisy.train_dataset.tensors
    repaired_labels = labels.clone()
    repaired_labels[fixed] = noisy.clean_train_targets[fixed]
    repaired = DigitsDataModule(flip_fraction=0.1, flip_mode=mode, seed=args.seed)
    repaired.train_dataset = TensorDataset(images, repaired_labels)
    print(f"Relabelled {len(fixed)} of {len(flagged)} flagged examples (the flipped ones).")

    clean = DigitsDataModule(seed=args.seed)
    _, acc_clean = train(clean, args.epochs, args.seed)
    _, acc_repaired = train(repaired, args.epochs, args.seed)
    print(
        f"Validation accuracy: clean {acc_clean:.4f}, noisy {acc_noisy:.4f}, "
        f"repaired {acc_repaired:.4f}"
    )


if __name__ == "__main__":
    main()
