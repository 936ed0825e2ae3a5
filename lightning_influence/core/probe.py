"""A probe: the scores of a fixed set of training examples, where users look at a solve.

Iterative solvers watch these scores to stop once the answer, not the vectors, has converged.
The examples are drawn by dataset index from one seeded permutation of the dataset, so every
process (and any number of them) probes the same examples; each process computes the scores of
those it holds, and a sum across processes gives every process all of them.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from lightning_influence.core.collective import Reduce, identity
from lightning_influence.core.data import IndexedData
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.scores import example_pass

__all__ = ["ScoreProbe", "draw_by_index"]

_BATCH = 16
KEEP_BYTES = 64 * 2**20


def draw_by_index(
    data: IndexedData, count: int, reduce: Reduce | None = None, seed: int = 0
) -> Tensor:
    """``count`` dataset indices of the examples in ``data`` (all of them when fewer), in the
    order of one permutation of the whole dataset seeded with ``seed``.

    Under data parallelism ``data`` is this process's shard and ``reduce`` sums across
    processes: the indices are those of the whole training set, the same on every process.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence.core.data import as_indexed
        >>> data = as_indexed(TensorDataset(torch.arange(10.0)))
        >>> draw_by_index(data, 3)
        tensor([4, 1, 7])
        >>> draw_by_index(data.subset(torch.tensor([1, 2, 3])), 20)  # all it holds, in that order
        tensor([1, 3, 2])
    """
    reduce = reduce or identity
    size = len(data.dataset)  # type: ignore[arg-type]  # map-style, checked by as_indexed
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    chunk = max(4 * count, 1024)
    found: list[Tensor] = []
    have = 0
    for start in range(0, order.numel(), chunk):
        candidates = order[start : start + chunk]
        held = torch.isin(candidates, data.indices).to(torch.float64)
        members = candidates[reduce(held) > 0]  # in some process's shard
        found.append(members[: count - have])
        have += int(found[-1].numel())
        if have >= count:
            break
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)


class ScoreProbe:
    """Scores ``-g_i . v`` of a fixed set of training examples ``i`` for each row ``v`` of a
    block, summed across processes (each computes those of the examples it holds). The
    examples' gradients are kept where they fit in 64 MiB; otherwise each call takes a scoring
    pass over them (a forward and backward pass of a few dozen examples).

    Args:
        model: the model as a function of its flat parameters.
        data: this process's training data.
        count: examples in the probe (all of the training set when it has fewer).
        reduce: sums a tensor across processes (identity on one process).
        seed: seeds the permutation the examples are drawn from.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_influence.core.data import as_indexed
        >>> from lightning_influence.core.task import ClassificationTask
        >>> fm = FunctionalModel(torch.nn.Linear(4, 3), ClassificationTask())
        >>> data = as_indexed(TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,))))
        >>> probe = ScoreProbe(fm, data, count=8)
        >>> probe(torch.randn(2, 15)).shape, probe.indices.shape
        (torch.Size([8, 2]), torch.Size([8]))
    """

    def __init__(
        self,
        model: FunctionalModel,
        data: IndexedData,
        count: int,
        reduce: Reduce | None = None,
        seed: int = 0,
    ) -> None:
        self.model, self.data, self.reduce = model, data, reduce or identity
        self.indices = draw_by_index(data, count, self.reduce, seed)
        held = torch.isin(self.indices, data.indices)
        self.slots = torch.nonzero(held).flatten()
        # small batches: their per-sample gradients stay within what the scoring pass holds
        self.local = data.subset(self.indices[held]).rebatched(min(data.batch_size, _BATCH))
        self._epoch_seconds: float | None = None
        # the gradients are kept when they fit in KEEP_BYTES, else each call takes a pass
        self._keep = len(self.local) * model.n_params * model.theta.element_size() <= KEEP_BYTES
        self._gradients: Tensor | None = None

    def __call__(self, vectors: Tensor) -> Tensor:
        """The probe's scores for each row of ``vectors``, ``[examples, rows]``."""
        model = self.model
        scores = torch.zeros(
            self.indices.numel(), vectors.shape[0], dtype=model.dtype, device=model.device
        )
        if len(self.local):
            self.prepare()
            part = (
                -self._gradients @ vectors.to(model.dtype).T
                if self._gradients is not None
                else example_pass(model, self.local, vectors.to(model.dtype)).scores
            )
            assert part is not None
            scores[self.slots.to(model.device)] = part.to(model.device)
        return self.reduce(scores)

    def prepare(self) -> None:
        """Compute the gradients of this process's probe examples once, where they are kept
        (no communication: the first call does it otherwise)."""
        if self._gradients is None and self._keep and len(self.local):
            self._gradients = example_pass(self.model, self.local, keep_gradients=True).gradients

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (so that all take the same branch)."""
        count = torch.tensor([float(flag)], dtype=torch.float64, device=self.model.device)
        return bool(self.reduce(count).item() > 0)

    def epoch_seconds(self) -> float:
        """Seconds of one training epoch on this process's data, timed once: a forward and
        backward pass of the loss over every batch (what a training step costs, less the
        optimizer), averaged over processes."""
        if self._epoch_seconds is None:
            model = self.model
            theta = model.theta.detach().requires_grad_()
            start = time.perf_counter()
            with torch.enable_grad():
                for _, batch in self.data.batches():
                    prepared = model.prepare(batch)
                    loss = model.losses(theta, prepared.inputs, prepared.targets).sum()
                    torch.autograd.grad(loss, theta)
            elapsed = time.perf_counter() - start
            pair = torch.tensor([elapsed, 1.0], dtype=torch.float64, device=model.device)
            total = self.reduce(pair)
            self._epoch_seconds = float(total[0] / total[1])
        return self._epoch_seconds
