"""scikit-learn's digits as a Lightning DataModule, and a small CNN for it.

Shared by the examples, the tests and the benchmarks. The data ships inside scikit-learn: nothing
is downloaded. Labels can be flipped with a fixed seed (for mislabel detection).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

# Pairs a tired annotator confuses: 1<->7, 3<->8, 4<->9, 5<->6 (0 and 2 are left alone).
CONFUSABLE = {1: 7, 7: 1, 3: 8, 8: 3, 4: 9, 9: 4, 5: 6, 6: 5}


def flip_labels(
    targets: Tensor, fraction: float, mode: Literal["random", "confusable"], seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Flip ``fraction`` of the labels; returns ``(noisy_targets, flipped_positions)``.

    ``"random"`` flips to a uniformly random other class; ``"confusable"`` to the look-alike class
    of :data:`CONFUSABLE` (only examples of those classes are eligible).
    """
    gen = torch.Generator().manual_seed(seed)
    noisy = targets.clone()
    eligible = torch.arange(len(targets))
    if mode == "confusable":
        eligible = eligible[torch.isin(targets, torch.tensor(list(CONFUSABLE)))]
    n_flip = round(fraction * len(targets))
    chosen = eligible[torch.randperm(len(eligible), generator=gen)[:n_flip]].sort().values
    for i in chosen.tolist():
        if mode == "confusable":
            noisy[i] = CONFUSABLE[int(targets[i])]
        else:
            shift = int(torch.randint(1, 10, (1,), generator=gen))
            noisy[i] = (targets[i] + shift) % 10
    return noisy, chosen


class DigitsDataModule(L.LightningDataModule):
    """8x8 digit images ``[1, 8, 8]`` scaled to [0, 1]; the first ``n_train`` (shuffled with a fixed
    seed) train, the rest validate. ``flip_fraction`` flips that share of the training labels."""

    def __init__(
        self,
        batch_size: int = 64,
        n_train: int = 1200,
        flip_fraction: float = 0.0,
        flip_mode: Literal["random", "confusable"] = "random",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        x, y = load_digits(return_X_y=True)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        images = torch.as_tensor(x, dtype=torch.float32)[perm].reshape(-1, 1, 8, 8) / 16.0
        labels = torch.as_tensor(y, dtype=torch.long)[perm]
        self.clean_train_targets = labels[:n_train]
        train_targets, self.flipped = self.clean_train_targets, torch.zeros(0, dtype=torch.long)
        if flip_fraction > 0:
            train_targets, self.flipped = flip_labels(
                self.clean_train_targets, flip_fraction, flip_mode, seed
            )
        self.train_dataset = TensorDataset(images[:n_train], train_targets)
        self.val_dataset = TensorDataset(images[n_train:], labels[n_train:])

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(self.val_dataset, batch_size=256)


class DigitsCNN(L.LightningModule):
    """Two 3x3 conv layers and a linear head (about 1,900 parameters), trained with Adam and L2
    weight decay ``weight_decay`` on all parameters (so ``damping=weight_decay`` matches it)."""

    def __init__(self, lr: float = 1e-2, weight_decay: float = 1e-3, channels: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * c * 4, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        params = torch.cat([p.reshape(-1) for p in self.parameters()])
        return loss + 0.5 * self.hparams.weight_decay * (params**2).sum()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
