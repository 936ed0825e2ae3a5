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
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
)

from lightning_influence.core.data import IndexedData, as_indexed

__all__ = ["Data", "dataset_of", "find_data", "indexed_data", "raise_no_data", "sampled_rows"]

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


def indexed_data(
    trainer: L.Trainer,
    module: L.LightningModule,
    train_dataset: Data | None,
    val_dataset: Data | None,
    final: bool = True,
) -> tuple[IndexedData, IndexedData] | None:
    """The training and validation data as :func:`find_data` finds them, restricted to the rows
    their samplers draw; ``None`` when one is missing, an error if ``final``."""
    train, val = find_data(trainer, module, train_dataset, val_dataset)
    if train is None or val is None:
        if final:
            raise_no_data(train is None, trainer)
        return None
    rows = sampled_rows(train, "training"), sampled_rows(val, "validation")
    return as_indexed(train, rows[0]), as_indexed(val, rows[1])


def raise_no_data(no_train: bool, trainer: L.Trainer | None = None) -> NoReturn:
    """Say which data is missing and where to give it."""
    which = "training" if no_train else "validation"
    hook = "train_dataloader" if which == "training" else "val_dataloader"
    override = "train_dataset" if which == "training" else "val_dataset"
    if not no_train and trainer is not None and trainer.limit_val_batches == 0:
        raise ValueError(
            "InfluenceCallback found no validation data: `limit_val_batches=0` keeps the Trainer "
            "from loading it. Pass `val_dataset=` to the callback (influence needs validation "
            "points, not validation batches)."
        )
    raise ValueError(
        f"InfluenceCallback found no {which} data: give the Trainer a `{hook}` (in the "
        f"datamodule, the LightningModule or `trainer.fit`) or pass `{override}=` to the callback."
    )


def sampled_rows(data: Data, which: str) -> Tensor | None:
    """The dataset indices a loader's sampler draws from; ``None`` when it is the whole dataset.

    A sampler that names a subset (``SubsetRandomSampler`` or any with ``indices``) gives its
    indices; a sequential, shuffling or distributed sampler over the whole dataset gives
    ``None``; any other sampler cannot be read and is refused, with the fix.

    Example:
        >>> from torch.utils.data import SubsetRandomSampler
        >>> loader = DataLoader(list(range(10)), sampler=SubsetRandomSampler([7, 2, 5]))
        >>> sampled_rows(loader, "training").tolist()
        [2, 5, 7]
    """
    if not isinstance(data, DataLoader):
        return None
    sampler: Any = data.sampler
    if data.batch_sampler is not None and not isinstance(data.batch_sampler, BatchSampler):
        sampler = getattr(data.batch_sampler, "sampler", data.batch_sampler)
    if isinstance(sampler, DistributedSamplerWrapper):  # Lightning's, around the user's sampler
        wrapped = sampler.dataset
        return torch.tensor(sorted({int(wrapped[i]) for i in range(len(wrapped))}))  # type: ignore[arg-type]
    indices = getattr(sampler, "indices", None)
    if indices is not None:
        return torch.as_tensor(list(indices), dtype=torch.long).unique()
    if isinstance(sampler, SequentialSampler | DistributedSampler):
        return None
    if (
        isinstance(sampler, RandomSampler)
        and not sampler.replacement
        and sampler.num_samples == len(sampler.data_source)
    ):
        return None
    name = type(sampler).__name__
    argument = "train_dataset" if which == "training" else "val_dataset"
    raise ValueError(
        f"InfluenceCallback cannot tell which examples the {which} loader's {name} draws (it "
        f"names no subset and is not a plain sequential or shuffling sampler), so scores could "
        f"not say which examples were used. Pass `{argument}=` a dataset of exactly those "
        "examples, e.g. `torch.utils.data.Subset(dataset, indices)`."
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
