"""Data parallelism: shard the training set, sum across processes, gather results by dataset index.

Under DDP every process scores its own shard of the training set (:func:`shard_indices`), the
curvature products are summed across processes (:func:`strategy_reduce`), so every process solves
the same system, and the per-process results are gathered into one :class:`InfluenceResult`
(:func:`gather_result`, through :meth:`InfluenceResult.merge`: rows sorted by dataset index,
duplicates such as a ``DistributedSampler``'s padding dropped, perturbation maps re-ranked).
The same code runs unchanged on one process.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lightning_influence.core.collective import Reduce
from lightning_influence.errors import InfluenceError
from lightning_influence.result import ROW_FIELDS, InfluenceResult

__all__ = ["agree_on_failure", "gather_result", "shard_indices", "strategy_reduce"]


def shard_indices(indices: Tensor, rank: int, world_size: int) -> Tensor:
    """This process's share of ``indices``: every ``world_size``-th one, starting at ``rank``.

    Shards are disjoint, cover ``indices`` and differ in size by at most one.

    Example:
        >>> import torch
        >>> shard_indices(torch.arange(7), rank=1, world_size=2)
        tensor([1, 3, 5])
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    return indices[rank::world_size]


def strategy_reduce(strategy: Any, world_size: int) -> Reduce | None:
    """A function that sums a tensor across processes with ``strategy.reduce``; ``None`` for one.

    ``strategy`` is a Lightning strategy (``trainer.strategy``). The sum is taken in place (no
    copy of a large block of products): the argument holds it afterwards.

    Example:
        >>> strategy_reduce(strategy=None, world_size=1) is None
        True
    """
    if world_size <= 1:
        return None

    def reduce(tensor: Tensor) -> Tensor:
        return strategy.reduce(tensor, reduce_op="sum")

    return reduce


def gather_result(result: InfluenceResult, strategy: Any, world_size: int) -> InfluenceResult:
    """Gather every process's result into one, on every process (a collective: call it on all).

    ``result`` holds this process's rows (its shard); ``strategy`` is ``trainer.strategy``. Rows
    are padded to the same length for ``strategy.all_gather`` and trimmed afterwards; the
    perturbation maps (per validation point, the same shape on every process) are gathered whole,
    the token shares padded to the most columns and the longest sequence.
    """
    if world_size <= 1:
        return result
    count = torch.tensor([result.n_train], dtype=torch.long, device=strategy.root_device)
    counts = strategy.all_gather(count).reshape(-1).tolist()
    longest = max(counts)
    gathered: dict[str, list[Tensor] | None] = {}
    for name in (*ROW_FIELDS, "perturbation", "perturbation_indices"):
        value = getattr(result, name)
        if value is None:
            gathered[name] = None
            continue
        is_row = name in ROW_FIELDS
        shape = (longest, *value.shape[1:]) if is_row else tuple(value.shape)
        padded = value.new_zeros(shape, device=strategy.root_device)
        padded[: value.shape[0]] = value
        stacked = strategy.all_gather(padded).cpu()
        gathered[name] = [
            stacked[r, : counts[r]] if is_row else stacked[r] for r in range(world_size)
        ]
    gathered["token_shares"], gathered["token_share_indices"] = _gather_token_shares(
        result, strategy, world_size
    )
    parts = []
    for r in range(world_size):
        fields: dict[str, Any] = {k: (v[r] if v else None) for k, v in gathered.items()}
        parts.append(replace(result, **fields))
    merged = InfluenceResult.merge(parts)
    merged.diagnostics = {**merged.diagnostics, "n_processes": float(world_size)}
    return merged


def _gather_token_shares(
    result: InfluenceResult, strategy: Any, world_size: int
) -> tuple[list[Tensor] | None, list[Tensor] | None]:
    """Each process's token shares and their training indices, padded to the most columns and
    the longest sequence of any process (NaN shares, ``-1`` indices); ``None`` unless every
    process has them."""
    shares, shown = result.token_shares, result.token_share_indices
    device = strategy.root_device
    size = [0, 0] if shares is None or shown is None else list(shares.shape[1:])
    sizes = strategy.all_gather(torch.tensor([shares is not None, *size], device=device))
    sizes = sizes.reshape(world_size, 3).cpu()
    if shares is None or shown is None or not bool(sizes[:, 0].all()):
        return None, None
    columns, length = (int(v) for v in sizes[:, 1:].max(dim=0).values)
    padded = shares.new_full((shares.shape[0], columns, length), float("nan"), device=device)
    padded[:, : shares.shape[1], : shares.shape[2]] = shares
    where = shown.new_full((shown.shape[0], columns), -1, device=device)
    where[:, : shown.shape[1]] = shown
    all_shares, all_where = strategy.all_gather(padded).cpu(), strategy.all_gather(where).cpu()
    return [all_shares[r] for r in range(world_size)], [all_where[r] for r in range(world_size)]


def agree_on_failure(strategy: Any, world_size: int, error: BaseException | None) -> None:
    """Raise when any process failed, the same way on every process (a collective: call it on
    all, failed or not), so that no process hangs in a collective the failed one never joins.

    On one process the error itself is raised; under data parallelism every process raises one
    :class:`~lightning_influence.InfluenceError` that quotes each failed process's error.

    Example:
        >>> agree_on_failure(strategy=None, world_size=1, error=None)  # nothing failed
    """
    if world_size <= 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([int(error is not None)], device=strategy.root_device)
    failed = [r for r, f in enumerate(strategy.all_gather(flag).reshape(-1).tolist()) if f]
    if not failed:
        return
    mine = f"{type(error).__name__}: {error}" if error is not None else None
    messages: dict[str, list[int]] = {}
    for rank in failed:  # every process takes part in each broadcast
        message = strategy.broadcast(mine if strategy.global_rank == rank else None, src=rank)
        messages.setdefault(str(message), []).append(rank)
    quoted = "; ".join(f"process {ranks}: {text}" for text, ranks in messages.items())
    raise InfluenceError(
        f"Influence failed on {len(failed)} of {world_size} processes. {quoted}"
    ) from error
