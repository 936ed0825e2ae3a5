"""Finding the data a ``Trainer`` trains and validates on, for the callback.

Data comes, in this order, from the callback's ``train_dataset=`` / ``val_dataset=``, the
trainer's loaders, then the datamodule's or the module's ``*_dataloader()`` hooks; with several
loaders the first is used. Only the dataset and the collate function of a loader are used, never
its sampler, so every score carries a dataset index.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, Dataset

__all__ = ["Data", "dataset_of", "find_data", "raise_no_data"]

Data = Dataset[Any] | DataLoader[Any]


def find_data(
    trainer: L.Trainer, module: L.LightningModule, train: Data | None, val: Data | None
) -> tuple[Data | None, Data | None]:
    """The given datasets, else the trainer's loaders, else the datamodule's or module's hooks."""

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


def raise_no_data(no_train: bool) -> NoReturn:
    """Say which data is missing and where to give it."""
    which = "training" if no_train else "validation"
    hook = "train_dataloader" if which == "training" else "val_dataloader"
    override = "train_dataset" if which == "training" else "val_dataset"
    raise ValueError(
        f"InfluenceCallback found no {which} data: give the Trainer a `{hook}` (in the "
        f"datamodule, the LightningModule or `trainer.fit`) or pass `{override}=` to the callback."
    )


def dataset_of(data: Data) -> Dataset[Any]:
    """The dataset behind a loader (or the dataset itself).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> import torch
        >>> data = TensorDataset(torch.zeros(3))
        >>> dataset_of(DataLoader(data)) is data
        True
    """
    return data.dataset if isinstance(data, DataLoader) else data
