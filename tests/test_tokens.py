"""Per-token shares of a score: against per-token gradients, and summing to the scores."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_influence import Exact, InfluenceResult, LanguageModelingTask, compute_influence
from lightning_influence.callback.distributed import gather_result
from lightning_influence.core import tokens
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.sequence import completion_example, pad_sequences
from lightning_influence.core.tokens import token_shares, token_shares_of
from lightning_influence.result import ROW_FIELDS

VOCAB = 7


class TinyLM(nn.Module):
    """Embeddings averaged causally, then a linear head: tokens interact, as in a real LM."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 3)
        self.head = nn.Linear(3, VOCAB)

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.embed(input_ids).cumsum(1)
        h = h / torch.arange(1, input_ids.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.head(torch.tanh(h))


def _sequences(n: int, seed: int) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 7, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        out.append(
            completion_example(ids[:2], ids[2:]) if length % 2 else {"input_ids": ids}
        )  # some with a prompt that has no loss
    return out


def _reference(
    fm: FunctionalModel, task: LanguageModelingTask, batch: dict[str, Tensor], u: Tensor, i: int
) -> Tensor:
    """``-u . grad l_t`` token by token, each gradient by its own backward pass."""
    inputs, labels = task.unpack(batch)
    theta = fm.theta.clone().requires_grad_(True)
    losses, counts = task.token_losses(fm.outputs(theta, inputs), labels)
    if task.reduction == "mean":
        losses = losses / counts.sum(1, keepdim=True)
    out = torch.full((labels.shape[1],), float("nan"), dtype=torch.float64)
    for t in range(losses.shape[1]):
        if counts[i, t]:
            (g,) = torch.autograd.grad(losses[i, t], theta, retain_graph=True)
            out[t + 1] = -(g @ u)
    return out


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_token_shares_against_per_token_gradients(reduction: str) -> None:
    torch.manual_seed(0)
    task = LanguageModelingTask(reduction=reduction)  # type: ignore[arg-type]
    fm = FunctionalModel(TinyLM(), task, dtype=torch.float64)
    batch = pad_sequences(_sequences(4, seed=1))
    vectors = torch.randn(3, fm.n_params, dtype=torch.float64)
    examples, columns = torch.tensor([0, 1, 1, 3, 2]), torch.tensor([2, 0, 1, 2, 1])
    shares = token_shares(fm, batch, vectors, examples, columns, chunk_size=2)
    for q in range(examples.numel()):
        expected = _reference(fm, task, batch, vectors[columns[q]], int(examples[q]))
        torch.testing.assert_close(shares[q], expected, rtol=1e-10, atol=1e-12, equal_nan=True)
    # each row sums to the pair's score, -u . grad L(z)
    inputs, labels = task.unpack(batch)
    grads = torch.stack(
        [
            torch.func.grad(lambda th, i=i: fm.losses(th, inputs, labels)[i])(fm.theta)
            for i in examples.tolist()
        ]
    )
    scores = -(grads * vectors[columns]).sum(1)
    torch.testing.assert_close(shares.nansum(1), scores, rtol=1e-10, atol=1e-12)


def test_compute_influence_shares_sum_to_scores(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyLM().double()
    train, val = _sequences(12, seed=2), _sequences(3, seed=3)
    result = compute_influence(
        model,
        torch.utils.data.DataLoader(train, batch_size=5, collate_fn=pad_sequences),  # type: ignore[arg-type]
        torch.utils.data.DataLoader(val, batch_size=3, collate_fn=pad_sequences),  # type: ignore[arg-type]
        task=LanguageModelingTask(),
        solver=Exact(),
        damping=0.1,
        token_k=2,
        progress=False,
    )
    shares, shown = result.token_shares, result.token_share_indices
    assert shares is not None and shown is not None
    assert shares.shape[:2] == shown.shape and shares.shape[2] == 6  # the longest sequence
    row = {int(i): p for p, i in enumerate(result.train_indices)}
    for j in range(3):
        expected: list[int] = []
        for relative in (False, True):
            for ranking in (result.helpful, result.harmful):
                expected += ranking(2, relative=relative).indices[j].tolist()
        assert set(shown[j][shown[j] >= 0].tolist()) == set(expected)
        for i in set(expected):
            pair = token_shares_of(shares, shown, j, i)
            assert pair is not None
            same = result.token_shares_of(i, val_index=int(result.val_indices[j]))
            torch.testing.assert_close(same, pair, rtol=0, atol=0, equal_nan=True)
            score = result.scores[row[i], j]
            torch.testing.assert_close(pair.nansum(), score, rtol=1e-10, atol=1e-12)
            padding = 6 - len(train[i]["input_ids"])  # padding, the first token and the prompt's
            assert pair.isnan().sum() == padding + 1 + ("labels" in train[i])  # second: no loss
    hidden = int(result.train_indices[~torch.isin(result.train_indices, shown[0])][0])
    assert result.token_shares_of(hidden, val_index=int(result.val_indices[0])) is None
    loaded = InfluenceResult.load(result.save(tmp_path / "result.pt"))
    assert loaded.equals(result)
    merged = InfluenceResult.merge([result, result])
    assert merged.token_shares is not None and merged.token_shares.shape[1] == 2 * shown.shape[1]


def test_without_forward_mode_two_reverse_passes_give_the_same_shares(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    task = LanguageModelingTask()
    fm = FunctionalModel(TinyLM(), task, dtype=torch.float64)
    batch = pad_sequences(_sequences(3, seed=4))
    vectors = torch.randn(2, fm.n_params, dtype=torch.float64)
    examples, columns = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 1])
    forward = token_shares(fm, batch, vectors, examples, columns)

    def no_forward_mode(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("Trying to use forward AD with mkldnn_rnn_layer")  # as nn.LSTM

    monkeypatch.setattr(tokens, "jvp", no_forward_mode)
    reverse = token_shares(fm, batch, vectors, examples, columns)
    torch.testing.assert_close(reverse, forward, rtol=1e-10, atol=1e-12, equal_nan=True)
    for q in range(3):
        expected = _reference(fm, task, batch, vectors[columns[q]], int(examples[q]))
        torch.testing.assert_close(reverse[q], expected, rtol=1e-10, atol=1e-12, equal_nan=True)


def test_a_model_that_cannot_be_differentiated_along_a_direction_keeps_its_scores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("derivative for '_embedding_bag_backward' is not implemented")

    monkeypatch.setattr(tokens, "token_shares", fails)
    data = pad_sequences(_sequences(6, seed=5))
    rows = [{k: v[i] for k, v in data.items()} for i in range(6)]
    with pytest.warns(UserWarning, match="Per-token shares are skipped.*token_k=0"):
        result = compute_influence(
            TinyLM(), rows, rows[:2], task=LanguageModelingTask(), solver=Exact(), damping=0.1,
            token_k=2, progress=False,
        )  # fmt: skip
    assert result.token_shares is None and result.scores.shape == (6, 2)


class _ThreadStrategy:
    """``all_gather`` between threads that stand for processes, as DDP's stacks tensors."""

    root_device = torch.device("cpu")

    def __init__(self, rank: int, slots: list[Tensor | None], barrier: threading.Barrier) -> None:
        self.rank, self.slots, self.barrier = rank, slots, barrier

    def all_gather(self, tensor: Tensor) -> Tensor:
        self.slots[self.rank] = tensor.clone()
        self.barrier.wait()
        stacked = torch.stack([t for t in self.slots if t is not None])  # shapes must agree
        self.barrier.wait()
        return stacked


def test_token_shares_gathered_from_every_process() -> None:
    torch.manual_seed(0)
    train = pad_sequences(_sequences(10, seed=6))
    rows = [{k: v[i] for k, v in train.items()} for i in range(10)]
    val = [{k: v[i] for k, v in pad_sequences(_sequences(3, seed=7)).items()} for i in range(3)]
    common = {"task": LanguageModelingTask(), "solver": Exact(), "damping": 0.1, "progress": False}
    full = compute_influence(TinyLM(), rows, val, token_k=2, **common)  # type: ignore[arg-type]
    assert full.token_shares is not None and full.token_share_indices is not None
    parts = []
    for shard in (torch.arange(0, 10, 2), torch.arange(1, 10, 2)):  # as two processes hold it
        keep = torch.isin(full.train_indices, shard)
        fields = {n: v[keep] for n in ROW_FIELDS if (v := getattr(full, n)) is not None}
        mine = torch.isin(full.token_share_indices, shard)
        columns = int(mine.sum(1).max())
        order = torch.argsort((~mine).int(), dim=1, stable=True)[:, :columns]
        shown = torch.where(mine, full.token_share_indices, -1).gather(1, order)
        shares = full.token_shares.gather(1, order[..., None].expand(-1, -1, 6))
        length = int((~shares.isnan()).any(0).any(0).nonzero().max()) + 1  # its own longest
        fields |= {"token_shares": shares[..., :length], "token_share_indices": shown}
        parts.append(dataclasses.replace(full, **fields))
    assert parts[0].token_shares.shape != parts[1].token_shares.shape  # type: ignore[union-attr]
    slots: list[Tensor | None] = [None, None]
    barrier = threading.Barrier(2)
    merged: list[InfluenceResult] = [full, full]

    def run(rank: int) -> None:
        strategy = _ThreadStrategy(rank, slots, barrier)
        merged[rank] = gather_result(parts[rank], strategy, world_size=2)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for result in merged:
        assert result is not full and torch.equal(result.scores, full.scores)
        for j in range(3):
            for i in full.token_share_indices[j][full.token_share_indices[j] >= 0].tolist():
                got = token_shares_of(result.token_shares, result.token_share_indices, j, i)
                want = token_shares_of(full.token_shares, full.token_share_indices, j, i)
                assert got is not None and want is not None
                torch.testing.assert_close(got[: want.numel()], want, equal_nan=True)
