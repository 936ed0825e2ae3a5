"""Per-token shares of a score: which tokens of a training sequence carry its influence.

A sequence's loss is the sum (or the mean) of its token losses ``l_t``, so its score against a
validation point, ``-u^T grad sum_t l_t`` with ``u = (H + damping I)^-1 g_val``, splits into one
share per token, ``-u^T grad l_t = -d/de l_t(theta + e u)`` at ``e = 0``. One forward-mode pass
(``torch.func.jvp``) along ``u`` gives every token's share at once, and the shares sum to the
score. Only the training sequences shown for each validation point (its top-k helpful and
harmful, raw and relative) pay for it.

Shares are aligned with the input tokens: with ``shift=True`` the loss of predicting token
``t + 1`` belongs to token ``t + 1``. Tokens without a loss (the first one, prompts and padding
labelled ``ignore_index``) hold NaN.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vmap

from lightning_influence.core.data import IndexedData
from lightning_influence.core.gradients import one_example, rows_of
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.scores import pairs_per_chunk
from lightning_influence.core.sequence import LanguageModelingTask

__all__ = [
    "has_token_losses",
    "merge_token_shares",
    "shown_rows",
    "token_shares",
    "token_shares_of",
    "token_shares_shown",
]


def has_token_losses(model: FunctionalModel) -> bool:
    """Whether the model's task sums token losses (a :class:`LanguageModelingTask`)."""
    return isinstance(model.task, LanguageModelingTask)


def _terms(task: LanguageModelingTask, outputs: Any, labels: Tensor) -> Tensor:
    """Each input token's term of the sequence loss, ``[batch, length]``: they sum to it."""
    losses, counts = task.token_losses(outputs, labels)
    if task.reduction == "mean":
        losses = losses / counts.sum(dim=1, keepdim=True).clamp_min(1).to(losses.dtype)
    return torch.nn.functional.pad(losses, (1, 0)) if task.shift else losses


def _counted(task: LanguageModelingTask, labels: Tensor) -> Tensor:
    """Which input tokens carry a loss, ``[batch, length]``."""
    counted = labels != task.ignore_index
    if task.shift:
        counted[:, 0] = False
    return counted


def token_shares(
    model: FunctionalModel,
    batch: Any,
    val_inverse: Tensor,
    examples: Tensor,
    vectors: Tensor,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-token shares of the scores of pairs: for example ``examples[q]`` of ``batch`` and row
    ``u = vectors[q]`` of ``val_inverse``, ``-d/de l_t(theta + e u)`` for each token ``t``,
    ``[pairs, length]``, NaN where a token has no loss. Each row sums (over the others) to the
    pair's score ``-u^T grad L(z)``. Pairs are run ``chunk_size`` at a time (by default
    :func:`~lightning_influence.core.scores.pairs_per_chunk`), by ``vmap`` of ``jvp``; a model
    without forward-mode derivatives (``nn.LSTM`` on CPU) or ``vmap`` rules takes two reverse
    passes per pair instead, for the same numbers.

    Example:
        >>> import torch
        >>> fm = FunctionalModel(torch.nn.Embedding(5, 5), LanguageModelingTask())
        >>> batch = torch.tensor([[1, 2, 3]])
        >>> shares = token_shares(fm, batch, torch.randn(2, 25), torch.tensor([0, 0]),
        ...                       torch.tensor([0, 1]))
        >>> shares.shape, bool(shares[:, 0].isnan().all()), bool(shares[:, 1:].isfinite().all())
        (torch.Size([2, 3]), True, True)
    """
    task = model.task
    if not isinstance(task, LanguageModelingTask):
        raise TypeError(
            f"Per-token shares need token losses (a LanguageModelingTask); got {type(task)}."
        )
    prepared = model.prepare(batch)
    inputs, labels = prepared.inputs, prepared.targets
    s = val_inverse.to(device=model.device, dtype=model.dtype)
    examples, vectors = examples.to(model.device), vectors.to(model.device)
    chunk = chunk_size or pairs_per_chunk(model, 0, prepared.size)

    def shares(x: Any, y: Tensor, u: Tensor) -> Tensor:
        def terms(theta: Tensor) -> Tensor:
            return _terms(task, model.outputs(theta, one_example(x)), one_example(y))[0]

        return -jvp(terms, (model.theta,), (u,))[1]

    def reverse(x: Any, y: Tensor, u: Tensor) -> Tensor:  # J u as d/dv (v^T J) u, twice backward
        theta = model.theta.detach().requires_grad_(True)
        terms = _terms(task, model.outputs(theta, one_example(x)), one_example(y))[0]
        v = torch.zeros_like(terms, requires_grad=True)
        (jtv,) = torch.autograd.grad(terms, theta, v, create_graph=True)
        return -torch.autograd.grad(jtv, v, u)[0]

    parts = []
    for start in range(0, examples.numel(), chunk):
        rows, cols = examples[start : start + chunk], vectors[start : start + chunk]
        try:
            with torch.no_grad():
                parts.append(vmap(shares)(rows_of(inputs, rows), labels[rows], s[cols]))
        except (RuntimeError, NotImplementedError):  # no forward-mode rule, or no vmap rule
            with torch.enable_grad():
                parts += [
                    reverse(rows_of(inputs, r), labels[r], s[c])[None]
                    for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
                ]
    out = torch.cat(parts) if parts else s.new_zeros((0, labels.shape[1]))
    return out.masked_fill(~_counted(task, labels[examples]), math.nan).detach()


def shown_rows(scores: Tensor, k: int, denominators: Tensor | None = None) -> Tensor:
    """Rows of ``scores`` (``[n_train, n_val]``) shown for each validation point: its ``k`` most
    helpful, its ``k`` most harmful, then those of the relative ranking (scores over
    ``denominators``) not among them; ``[n_val, columns]``, ``-1`` past a point's own.

    Example:
        >>> scores = torch.tensor([[-3.0], [-1.0], [2.0], [0.5]])
        >>> shown_rows(scores, 1).tolist(), shown_rows(scores, 1, torch.tensor([9.0, 1, 1, 1]))
        ([[0, 2]], tensor([[0, 2, 1]]))
    """
    k = min(k, scores.shape[0])
    rankings = [scores]
    if denominators is not None:
        rankings.append(scores / denominators.to(scores)[:, None])
    picks = []
    for ranked in rankings:
        picks += [torch.topk(ranked.T, k, largest=False).indices, torch.topk(ranked.T, k).indices]
    candidates = torch.cat(picks, dim=1)
    rows = [list(dict.fromkeys(r)) for r in candidates.tolist()]  # first places, in order
    width = max(len(r) for r in rows) if rows else 0
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long).reshape(
        len(rows), width
    )


def token_shares_shown(
    model: FunctionalModel,
    train: IndexedData,
    indices: Tensor,
    scores: Tensor,
    val_inverse: Tensor,
    k: int,
    denominators: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Per-token shares of the scores of the training sequences :func:`shown_rows` picks, as
    ``(shares [n_val, columns, length], dataset indices [n_val, columns])``: ``-1`` indices and
    NaN shares past a validation point's own columns; ``(None, None)``, with a warning, for a
    model that cannot be differentiated along a direction at all. Pairs are ordered by training
    example and fetched a batch at a time, each example once."""
    pick = shown_rows(scores, k, denominators)
    kept = (pick >= 0).reshape(-1).nonzero().flatten()
    rows = pick.reshape(-1)[kept]
    vectors = torch.arange(pick.shape[0]).repeat_interleave(pick.shape[1])[kept]
    order = torch.argsort(rows, stable=True)
    chunk = pairs_per_chunk(model, 0, train.batch_size)  # pairs differentiated at once
    fetched = max(chunk, train.batch_size)  # pairs whose examples are fetched at once
    pieces: list[tuple[Tensor, Tensor]] = []
    for start in range(0, rows.numel(), fetched):
        pairs = order[start : start + fetched]
        examples, position = torch.unique(rows[pairs], return_inverse=True)
        batch = train.fetch(indices[examples])
        try:
            part = token_shares(model, batch, val_inverse, position, vectors[pairs], chunk)
        except (RuntimeError, NotImplementedError) as err:
            warnings.warn(
                f"Per-token shares are skipped: the model cannot be differentiated along a "
                f"direction in parameter space ({type(err).__name__}: {str(err)[:200]}). The "
                "scores are complete; pass token_k=0 to silence this.",
                stacklevel=3,
            )
            return None, None
        pieces.append((kept[pairs], part.cpu()))
    length = max((p.shape[1] for _, p in pieces), default=0)
    flat = torch.full((pick.numel(), length), math.nan, dtype=val_inverse.dtype)
    for at, part in pieces:
        flat[at, : part.shape[1]] = part.to(flat.dtype)
    where = torch.where(pick >= 0, indices[pick.clamp_min(0)], -1)
    return flat.reshape(*pick.shape, length), where


def token_shares_of(
    shares: Tensor | None, shown: Tensor | None, val_position: int, train_index: int
) -> Tensor | None:
    """The shares ``[length]`` of training dataset index ``train_index`` for the validation
    point in column ``val_position``, or ``None`` when not computed for that pair.

    Example:
        >>> shares = torch.tensor([[[0.5, 1.0], [2.0, 3.0]]])
        >>> token_shares_of(shares, torch.tensor([[7, 4]]), 0, 4)
        tensor([2., 3.])
    """
    if shares is None or shown is None:
        return None
    hits = (shown[val_position] == train_index).nonzero().flatten()
    return None if hits.numel() == 0 else shares[val_position, int(hits[0])]


def merge_token_shares(
    shares: list[Tensor | None], shown: list[Tensor | None]
) -> tuple[Tensor | None, Tensor | None]:
    """Join the shares of results computed on disjoint shards: each validation point's columns
    side by side, lengths padded with NaN (a shown example is always in its shard's own)."""
    if not shares or any(s is None for s in shares) or any(i is None for i in shown):
        return None, None
    parts = [s for s in shares if s is not None]
    length = max(s.shape[2] for s in parts)
    padded = [torch.nn.functional.pad(s, (0, length - s.shape[2]), value=math.nan) for s in parts]
    return torch.cat(padded, dim=1), torch.cat([i for i in shown if i is not None], dim=1)
