"""Sequence tasks and PyTorch's built-in transformer layers, against plain autograd references."""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import agreement
import pytest
import torch
import torch.nn.functional as F
from planted_facts import CausalTransformer, LanguageModel
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_influence import (
    Exact,
    FunctionalModel,
    LanguageModelingTask,
    LiSSA,
    SequenceClassificationTask,
    TaskError,
    completion_example,
    compute_influence,
)
from lightning_influence.core.attention import differentiable_attention
from lightning_influence.core.curvature import Curvature
from lightning_influence.core.data import as_indexed
from lightning_influence.core.gradients import per_sample_gradients
from lightning_influence.core.products import gauss_newton_products
from lightning_influence.core.sequence import pad_sequences

VOCAB, LENGTH = 8, 6


def _tiny_lm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CausalTransformer(VOCAB, LENGTH, width=8, layers=1, heads=2).double().eval()


def _token_batch(n: int, seed: int = 1) -> dict[str, Tensor]:
    """Sequences of random lengths (2..LENGTH), right-padded, some with a prompt to ignore."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        k = int(torch.randint(2, LENGTH + 1, (1,), generator=gen))
        ids = torch.randint(1, VOCAB, (k,), generator=gen)
        examples.append(
            completion_example(ids[:2], ids[2:]) if i % 3 == 0 and k > 2 else {"input_ids": ids}
        )
    batch = pad_sequences(examples)
    pad = LENGTH - batch["input_ids"].shape[1]
    return {
        "input_ids": F.pad(batch["input_ids"], (0, pad)),
        "attention_mask": F.pad(batch["attention_mask"], (0, pad)),
        "labels": F.pad(batch["labels"], (0, pad), value=-100),
    }


# ------------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_language_modeling_loss_is_cross_entropy_over_counted_tokens(reduction: str) -> None:
    logits = torch.randn(4, 5, 7, dtype=torch.float64)
    ids = torch.randint(0, 7, (4, 5))
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]])
    labels = ids.clone()
    labels[2, :3] = -100  # a prompt
    task = LanguageModelingTask(reduction=reduction)  # type: ignore[arg-type]
    _, targets = task.unpack({"input_ids": ids, "attention_mask": mask, "labels": labels})
    got = task.loss(logits, targets)
    for b in range(4):
        keep = (labels[b, 1:] != -100) & (mask[b, 1:] == 1)
        ref = F.cross_entropy(logits[b, :-1][keep], ids[b, 1:][keep], reduction=reduction)
        torch.testing.assert_close(got[b], ref, rtol=1e-12, atol=1e-12)


def test_language_modeling_without_shift_compares_position_by_position() -> None:
    logits = torch.randn(2, 4, 5, dtype=torch.float64)
    x, y = torch.randint(0, 5, (2, 4)), torch.randint(0, 5, (2, 4))
    task = LanguageModelingTask(shift=False)
    inputs, targets = task.unpack((x, y))
    assert torch.equal(inputs["input_ids"], x)
    ref = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)
    torch.testing.assert_close(task.loss(logits, targets), ref)


def test_task_loss_matches_the_training_step_loss() -> None:
    module = LanguageModel(CausalTransformer(VOCAB, LENGTH, width=8, layers=1, heads=2)).double()
    batch = _token_batch(7)
    step_loss = module.training_step(batch, 0)
    task = LanguageModelingTask(reduction="sum")
    fm = FunctionalModel(module.eval(), task)
    inputs, labels, _ = fm.check_batch(batch)
    counted = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(fm.losses(fm.theta, inputs, labels).sum() / counted, step_loss)


def test_sequence_tasks_reject_bad_arguments_and_batches() -> None:
    with pytest.raises(ValueError, match="reduction"):
        LanguageModelingTask(reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ignore_index"):
        LanguageModelingTask(ignore_index=0)
    with pytest.raises(TaskError, match="input_ids"):
        LanguageModelingTask().unpack({"tokens": torch.zeros(2, 3)})
    with pytest.raises(TaskError, match="labels"):
        SequenceClassificationTask().unpack({"input_ids": torch.zeros(2, 3, dtype=torch.long)})
    with pytest.raises(TaskError, match="shift"):
        LanguageModelingTask(shift=False).loss(torch.zeros(1, 3, 4), torch.zeros(1, 2).long())


def test_describe_decodes_tokens_without_padding() -> None:
    words = ["<pad>", "the", "capital", "is"]
    task = LanguageModelingTask(decode=lambda ids: " ".join(words[i] for i in ids))
    example = {
        "input_ids": torch.tensor([1, 2, 3, 0]),
        "attention_mask": torch.tensor([1, 1, 1, 0]),
    }
    assert task.describe(example) == "the capital is"
    assert LanguageModelingTask().describe({"input_ids": torch.tensor([4, 5])}) == "4 5"


@dataclass
class _Output:
    logits: Tensor


class _BagClassifier(nn.Module):
    """Mean of the embeddings of the unmasked tokens, then a linear layer; returns `.logits`."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(VOCAB, 5), nn.Linear(5, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> _Output:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        return _Output(self.out(torch.tanh(pooled)))


def _loop_gradients(
    model: nn.Module,
    task: LanguageModelingTask | SequenceClassificationTask,
    batch: dict[str, Tensor],
    names: list[str],
) -> Tensor:
    """Reference: one plain backward pass per example."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        inputs, targets = task.unpack(one)
        loss = task.loss(task.forward(model, inputs), targets).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(params[n])).reshape(-1)
                    for g, n in zip(grads, names, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def test_sequence_classification_gradients_match_a_loop() -> None:
    torch.manual_seed(0)
    model = _BagClassifier().double()
    batch = _token_batch(5)
    batch["labels"] = torch.tensor([0, 2, 1, 1, 0])
    task = SequenceClassificationTask()
    fm = FunctionalModel(model, task)
    inputs, labels, _ = fm.check_batch(batch)
    got = per_sample_gradients(fm, inputs, labels)
    torch.testing.assert_close(got, _loop_gradients(model, task, batch, fm.names))


# ------------------------------------------------------------------ built-in transformer layers


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_transformer_gradients_match_a_loop_without_fallback(chunk_size: int | None) -> None:
    model = _tiny_lm()
    batch = _token_batch(9)
    task = LanguageModelingTask(chunk_size=chunk_size)
    fm = FunctionalModel(model, task)
    inputs, labels, _ = fm.check_batch(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the loop fallback nor a missing vmap rule
        got = per_sample_gradients(fm, inputs, labels)
    ref = _loop_gradients(model, task, batch, fm.names)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


@pytest.mark.parametrize("kind", ["hessian", "gauss_newton"])
def test_transformer_curvature_products_match_the_dense_matrix(kind: str) -> None:
    model = _tiny_lm()
    batch = _token_batch(6)
    task = LanguageModelingTask()
    fm = FunctionalModel(model, task, parameters=["blocks.*", "head.*"])
    data = as_indexed(TensorDataset(batch["input_ids"], batch["labels"]))
    curvature = Curvature(fm, data, kind=kind)  # type: ignore[arg-type]
    inputs, labels = task.unpack((batch["input_ids"], batch["labels"]))
    if kind == "hessian":

        def mean_loss(theta: Tensor) -> Tensor:
            return fm.losses(theta, inputs, labels).mean()

        with differentiable_attention():
            dense = torch.autograd.functional.hessian(mean_loss, fm.theta)
    else:
        dense = curvature.dense()  # per-example Jacobians: reverse mode only
    vectors = torch.randn(3, fm.n_params, dtype=torch.float64)
    if kind == "hessian":
        products = curvature.matvec(vectors)  # forward-over-reverse through the layers
    else:  # forward mode for J v, whichever method the timing would pick
        out = fm.outputs(fm.theta, inputs).detach()
        products = gauss_newton_products(fm, inputs, labels, out, vectors) / 6
    torch.testing.assert_close(products, vectors @ dense, rtol=1e-7, atol=1e-9)


def test_differentiable_attention_restores_settings_after_an_error() -> None:
    with pytest.raises(RuntimeError), differentiable_attention():
        assert not torch.backends.mha.get_fastpath_enabled()
        raise RuntimeError("boom")
    assert torch.backends.mha.get_fastpath_enabled()


def _trained_tiny_lm(steps: int = 60) -> tuple[nn.Module, TensorDataset, TensorDataset]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (48, LENGTH), generator=gen)
    ids[:, 2] = (ids[:, 1] + 1) % VOCAB  # something learnable
    model = _tiny_lm().train()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    task = LanguageModelingTask(reduction="mean")
    for _ in range(steps):
        opt.zero_grad()
        task.loss(model(ids), ids).mean().backward()
        opt.step()
    queries = [completion_example(ids[i, :2], ids[i, 2:3]) for i in range(6)]
    prompts = torch.stack([q["input_ids"] for q in queries])
    labels = torch.stack([q["labels"] for q in queries])
    return model.eval(), TensorDataset(ids, ids), TensorDataset(prompts, labels)


@pytest.mark.slow
def test_default_solver_matches_exact_on_a_tiny_transformer() -> None:
    model, train, queries = _trained_tiny_lm()
    # Damping 1 against a curvature scale near 170: the default LiSSA needs about 500 steps.
    common = dict(task=LanguageModelingTask(), damping=1.0, self_influence=False, progress=False)
    exact = compute_influence(model, train, queries, solver=Exact(), **common)  # type: ignore[arg-type]
    default = compute_influence(model, train, queries, solver=LiSSA(), **common)  # type: ignore[arg-type]
    pearson, spearman = (
        agreement.pearson(exact.scores, default.scores),
        agreement.spearman(exact.scores, default.scores),
    )
    print(
        f"default solver vs Exact on a tiny transformer: Pearson {pearson:.4f}, "
        f"Spearman {spearman:.4f}"
    )
    assert pearson >= 0.99
    assert spearman >= 0.97


def test_decoded_text_in_the_csv_files_and_tensorboard(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from report_case import table_rows, tb_text, tensorboard_events

    from lightning_influence.report import LogSettings, log_influence

    words = [f"w{i}" for i in range(VOCAB)]
    task = LanguageModelingTask(decode=lambda ids: " ".join(words[i] for i in ids))
    model, train, queries = _trained_tiny_lm(steps=5)
    result = compute_influence(
        model, train, queries, task=task, solver=Exact(), damping=0.1, progress=False
    )
    settings = LogSettings(n_val=2, top_k=3, n_outliers=4)
    logger = TensorBoardLogger(tmp_path, name="tb")
    log_influence(result, [logger], train, queries, task, tmp_path / "out", settings)

    def text(data: TensorDataset, index: int) -> str:
        return " ".join(words[i] for i in data[index][0].tolist())

    with (tmp_path / "out" / "influence_rankings.csv").open() as f:
        rows = list(csv.DictReader(f))
    for ranking, relative in (("raw", False), ("relative", True)):
        top = int(result.helpful(1, relative=relative).indices[0, 0])
        first = next(
            r
            for r in rows
            if r["val_index"] == "0" and r["kind"] == "helpful" and r["ranking"] == ranking
        )
        assert first["train_index"] == str(top) and first["input"] == text(train, top)
        assert first["val_input"] == text(queries, 0)
    with (tmp_path / "out" / "influence_outliers.csv").open() as f:
        outlier = next(csv.DictReader(f))
    worst = int(result.outliers(1).indices[0])
    assert outlier["index"] == str(worst) and outlier["input"] == text(train, worst)
    tb_rows = table_rows(tb_text(tensorboard_events(tmp_path / "tb"), "influence/val_0"))
    top = int(result.helpful(1, relative=True).indices[0, 0])  # the relative table comes first
    assert tb_rows[0][2] == str(top) and tb_rows[0][-1] == f"`{text(train, top)}`"


def test_callback_shows_decoded_sequences_in_tensorboard(tmp_path: Path) -> None:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from report_case import table_rows, tb_text, tensorboard_events
    from torch.utils.data import DataLoader

    from lightning_influence import InfluenceCallback

    words = [f"w{i}" for i in range(VOCAB)]
    _, train, queries = _trained_tiny_lm(steps=0)
    module = LanguageModel(CausalTransformer(VOCAB, LENGTH, width=8, layers=1, heads=2))

    def as_dict(rows: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        return {
            "input_ids": torch.stack([r[0] for r in rows]),
            "labels": torch.stack([r[1] for r in rows]),
        }

    batches = DataLoader(train, batch_size=16, collate_fn=as_dict)
    callback = InfluenceCallback(
        task=LanguageModelingTask(decode=lambda ids: " ".join(words[i] for i in ids)),
        solver="exact",
        damping=0.1,
        self_influence=False,
        perturbation_k=0,  # input-space maps need floating-point inputs, not token ids
        train_dataset=train,
        val_dataset=queries,
        log_val=1,
        top_k=2,
    )
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, batches)
    assert callback.result is not None
    top = int(callback.result.helpful(1).indices[0, 0])
    text = tb_text(tensorboard_events(tmp_path / "tb"), "influence/val_0")
    assert "Input: `" + " ".join(words[i] for i in queries[0][0].tolist()) + "`" in text
    row = table_rows(text)[0]
    plain = re.sub(r"\[(\S+) -?\d+%\]", r"\1", row[-1])  # the tokens that carry the score marked
    assert row[2] == str(top) and plain == "`" + " ".join(words[i] for i in train[top][0]) + "`"
    assert "%]" in row[-1]
