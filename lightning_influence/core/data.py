"""Deterministic, index-carrying access to a dataset.

Every score the package produces carries the dataset index of its example, whatever sampler or
shuffling the training run used. :class:`IndexedData` walks a chosen list of dataset indices in
order, in batches, and can also fetch any random subset (for stochastic curvature estimates).
:func:`random_ranks` orders the examples at random by dataset index, so that every subsample
drawn from that order is the same whatever the number of processes sharing the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

__all__ = ["IndexedData", "as_indexed", "random_ranks"]


@dataclass
class IndexedData:
    """A dataset, the dataset indices to use (in order), a batch size and a collate function.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = as_indexed(TensorDataset(torch.arange(5.0), torch.arange(5)), batch_size=2)
        >>> [idx.tolist() for idx, _ in data.batches()]
        [[0, 1], [2, 3], [4]]
    """

    dataset: Dataset[Any]
    indices: Tensor
    batch_size: int
    collate_fn: Callable[[list[Any]], Any] = default_collate

    def __len__(self) -> int:
        return int(self.indices.numel())

    def fetch(self, indices: Tensor) -> Any:
        """The collated batch of the given dataset indices."""
        if isinstance(self.dataset, TensorDataset) and self.collate_fn is default_collate:
            return [t[indices] for t in self.dataset.tensors]
        return self.collate_fn([self.dataset[int(i)] for i in indices])

    def batches(self) -> Iterator[tuple[Tensor, Any]]:
        """Yield ``(dataset_indices, batch)`` in order."""
        for start in range(0, len(self), self.batch_size):
            idx = self.indices[start : start + self.batch_size]
            yield idx, self.fetch(idx)

    def rebatched(self, batch_size: int) -> IndexedData:
        """The same examples in batches of ``batch_size``."""
        return IndexedData(self.dataset, self.indices, batch_size, self.collate_fn)

    def subset(self, indices: Tensor) -> IndexedData:
        """The same data restricted to the given dataset indices."""
        return IndexedData(self.dataset, indices, self.batch_size, self.collate_fn)


def as_indexed(
    data: Dataset[Any] | DataLoader[Any] | IndexedData,
    indices: Sequence[int] | Tensor | None = None,
    batch_size: int | None = None,
) -> IndexedData:
    """Wrap a ``Dataset`` or ``DataLoader`` (its dataset and collate function) for ordered access.

    ``indices`` restricts to those dataset indices (all by default). ``batch_size`` defaults to the
    loader's batch size, else 64 (also for a loader with ``batch_size=None``, whose examples are
    then collated with ``default_collate``).
    """
    if isinstance(data, IndexedData):
        base = data
    elif isinstance(data, DataLoader):
        # `batch_size=None` turns batching off: its collate function converts single examples
        batched = data.batch_sampler is not None
        base = IndexedData(
            data.dataset,
            torch.arange(_length(data.dataset)),
            data.batch_size or 64,
            (data.collate_fn or default_collate) if batched else default_collate,
        )
    else:
        base = IndexedData(data, torch.arange(_length(data)), 64)
    if indices is not None:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = _length(base.dataset)
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.numel():
            raise IndexError(
                f"Dataset indices {bad[:10].tolist()} are out of range for a dataset of {n} "
                f"examples; valid indices are 0..{n - 1}."
            )
        base = base.subset(idx)
    if batch_size is not None:
        base = base.rebatched(batch_size)
    return base


def random_ranks(
    indices: Tensor,
    dataset_size: int,
    seed: int = 0,
    reduce: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, int]:
    """Each of ``indices``' rank in one random order of the dataset indices held by any process,
    and how many those are.

    The order is a permutation of all ``dataset_size`` indices drawn from ``seed``, restricted to
    the held ones (``reduce`` sums a ``[dataset_size]`` mask over processes, on ``device``): each
    process gets the ranks of its own indices, and the rank of an index is the same whatever
    number of processes share the indices, so are the examples of any window of ranks.

    Example:
        >>> import torch
        >>> ranks, held = random_ranks(torch.tensor([3, 0, 4]), dataset_size=6, seed=0)
        >>> ranks, held
        (tensor([0, 1, 2]), 3)
        >>> summed = torch.zeros(6)  # the masks of two processes holding [3, 0] and [4], summed
        >>> summed[[3, 0, 4]] = 1
        >>> random_ranks(torch.tensor([4]), 6, seed=0, reduce=lambda mask: summed)
        (tensor([2]), 3)
    """
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(dataset_size, dtype=torch.float32, device=device)
    mask[indices.to(device)] = 1.0
    held = (reduce(mask) if reduce is not None else mask).cpu() > 0
    in_order = held[order]
    rank_of = torch.empty(dataset_size, dtype=torch.long)
    rank_of[order] = torch.cumsum(in_order, 0) - 1
    return rank_of[indices.cpu()], int(in_order.sum())


def _length(dataset: Dataset[Any]) -> int:
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(
            f"Influence needs a map-style dataset with a length; got {type(dataset).__name__}. "
            "Iterable datasets cannot be indexed: wrap the data in a map-style Dataset."
        ) from err
