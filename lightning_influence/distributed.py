"""Data parallelism: shard the training set, sum across processes, gather results by dataset index.

Under DDP every process scores its own shard of the training set (:func:`shard_indices`), the
curvature products are summed across processes (:func:`strategy_reduce`), so every process solves
the same system, and the per-process results are gathered into one :class:`InfluenceResult`
(:func:`gather_result`), whose rows are sorted by dataset index with duplicates dropped
(:func:`merge_results`). The same code runs unchanged on one process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lightning_influence.results import InfluenceResult

__all__ = ["gather_result", "merge_results", "shard_indices", "strategy_reduce"]

Reduce = Callable[[Tensor], Tensor]

# Fields with one row per training example, in the order of `train_indices`.
_ROW_FIELDS = (
    "scores",
    "train_indices",
    "self_influence",
    "train_losses",
    "train_targets",
    "train_predictions",
)


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

    ``strategy`` is a Lightning strategy (``trainer.strategy``). Its ``reduce`` all-reduces in
    place, so the function reduces a copy and leaves its argument unchanged.

    Example:
        >>> strategy_reduce(strategy=None, world_size=1) is None
        True
    """
    if world_size <= 1:
        return None

    def reduce(tensor: Tensor) -> Tensor:
        return strategy.reduce(tensor.clone(), reduce_op="sum")

    return reduce


def merge_results(parts: Sequence[InfluenceResult]) -> InfluenceResult:
    """Join results that scored different training examples against the same validation points.

    Rows are sorted by dataset index; a training index seen more than once (the padding of a
    ``DistributedSampler``) is kept once, from the first part that has it. Validation data,
    settings and diagnostics come from the first part.

    Example:
        >>> import torch
        >>> def part(train):
        ...     rows = torch.tensor(train, dtype=torch.float32)[:, None]
        ...     return InfluenceResult(scores=rows, train_indices=torch.tensor(train),
        ...                            val_indices=torch.tensor([0]))
        >>> merged = merge_results([part([0, 2, 4]), part([1, 3, 0])])
        >>> merged.train_indices.tolist(), merged.scores[:, 0].tolist()
        ([0, 1, 2, 3, 4], [0.0, 1.0, 2.0, 3.0, 4.0])
    """
    if not parts:
        raise ValueError("`parts` is empty: there is nothing to merge.")
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if not torch.equal(part.val_indices, first.val_indices):
            raise ValueError(
                f"Part {i} scored validation indices {part.val_indices[:8].tolist()}..., part 0 "
                f"scored {first.val_indices[:8].tolist()}...: every process must use the same "
                "validation points (same `val_indices`, or the same `num_val` and `seed`)."
            )
    rows: dict[str, Tensor | None] = {}
    for name in _ROW_FIELDS:
        values = [getattr(p, name) for p in parts]
        rows[name] = None if any(v is None for v in values) else torch.cat(values)
    indices = rows["train_indices"]
    assert indices is not None
    order = _first_occurrences_sorted(indices)
    picked = {k: (v[order] if v is not None else None) for k, v in rows.items()}
    return replace(first, **picked, **_merge_perturbation(parts, picked))  # type: ignore[arg-type]


def gather_result(result: InfluenceResult, strategy: Any, world_size: int) -> InfluenceResult:
    """Gather every process's result into one, on every process (a collective: call it on all).

    ``result`` holds this process's rows (its shard); ``strategy`` is ``trainer.strategy``. Rows
    are padded to the same length for ``strategy.all_gather`` and trimmed afterwards.
    """
    if world_size <= 1:
        return result
    count = torch.tensor([result.n_train], dtype=torch.long, device=strategy.root_device)
    counts = strategy.all_gather(count).reshape(-1).tolist()
    longest = max(counts)
    gathered: dict[str, list[Tensor] | None] = {}
    for name in _ROW_FIELDS + _perturbation_fields(result):
        value = getattr(result, name)
        if value is None:
            gathered[name] = None
            continue
        is_row = name in _ROW_FIELDS
        shape = (longest, *value.shape[1:]) if is_row else tuple(value.shape)
        padded = value.new_zeros(shape, device=strategy.root_device)
        padded[: value.shape[0]] = value
        stacked = strategy.all_gather(padded).cpu()
        gathered[name] = [
            stacked[r, : counts[r]] if is_row else stacked[r] for r in range(world_size)
        ]
    parts = []
    for r in range(world_size):
        fields: dict[str, Any] = {k: (v[r] if v else None) for k, v in gathered.items()}
        parts.append(replace(result, **fields))
    merged = merge_results(parts)
    merged.diagnostics = {**merged.diagnostics, "n_processes": float(world_size)}
    return merged


def _first_occurrences_sorted(indices: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct value, ordered by value."""
    order = torch.argsort(indices, stable=True)
    sorted_values = indices[order]
    keep = torch.ones_like(sorted_values, dtype=torch.bool)
    keep[1:] = sorted_values[1:] != sorted_values[:-1]
    return order[keep]


def _perturbation_fields(result: InfluenceResult) -> tuple[str, ...]:
    names = ("perturbation", "perturbation_indices")
    return tuple(n for n in names if getattr(result, n, None) is not None)


def _merge_perturbation(
    parts: Sequence[InfluenceResult], rows: dict[str, Tensor | None]
) -> dict[str, Tensor]:
    """Keep, for each validation point, the global top-k helpful and harmful perturbation maps.

    Each part holds maps for its own top-k (``k`` helpful then ``k`` harmful, per validation
    point); the global top-k is among the union of them, ranked by the merged scores.
    """
    if not _perturbation_fields(parts[0]) or len(parts) == 1:
        return {}
    maps = torch.cat([getattr(p, "perturbation") for p in parts], dim=1)  # noqa: B009
    cands = torch.cat([getattr(p, "perturbation_indices") for p in parts], dim=1)  # noqa: B009
    k = cands.shape[1] // (2 * len(parts))
    scores, train_indices = rows["scores"], rows["train_indices"]
    assert scores is not None and train_indices is not None
    row_of = torch.full((int(train_indices.max()) + 1,), -1, dtype=torch.long)
    row_of[train_indices] = torch.arange(train_indices.numel())
    n_parts = len(parts)
    out_maps, out_idx = [], []
    for j in range(cands.shape[0]):
        chosen = []
        for block, largest in ((0, False), (1, True)):
            pos = torch.cat(
                [
                    torch.arange(r * 2 * k + block * k, r * 2 * k + (block + 1) * k)
                    for r in range(n_parts)
                ]
            )
            pos = pos[pos < cands.shape[1]]
            ids = cands[j, pos]
            cand_scores = scores[row_of[ids], j]
            best = torch.topk(cand_scores, min(k, ids.numel()), largest=largest).indices
            chosen.append(pos[best])
        sel = torch.cat(chosen)
        out_maps.append(maps[j, sel])
        out_idx.append(cands[j, sel])
    return {"perturbation": torch.stack(out_maps), "perturbation_indices": torch.stack(out_idx)}
