"""Tasks for sequence models: language modelling, sequence classification, completion queries.

:class:`LanguageModelingTask` scores a token sequence by the sum (or the mean) of its token losses
over the tokens that count: ``labels`` other than ``ignore_index``, and positions that the
``attention_mask`` keeps. The per-sample gradient of that per-sequence loss is already the sum of
the per-token gradients, so memory holds one ``[p]`` vector per sequence whatever its length.

A query that is a completion (a prompt, then the answer) is an example whose labels ignore the
prompt: :func:`completion_example` builds one, so the influence answers "which training sequences
raised or lowered the probability of this completion".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_influence.core.task import Task, TaskError, describe_structure
from lightning_influence.validation import check_positive_int

__all__ = [
    "IGNORE_INDEX",
    "LanguageModelingTask",
    "SequenceClassificationTask",
    "completion_example",
    "pad_sequences",
]

IGNORE_INDEX = -100
Decode = Callable[[list[int]], str]


def _logits(outputs: Any) -> Tensor:
    """The logits of a model output: a tensor, an object with ``.logits``, or a dict."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TaskError(
        f"The model returned {describe_structure(outputs)}; expected logits: a tensor, a dict with "
        "'logits' or an object with a `.logits` attribute. Override `forward` to return them."
    )


def _call(model: nn.Module, inputs: Mapping[str, Tensor], keys: Sequence[str] | None) -> Any:
    if keys is None:
        return model(inputs["input_ids"])
    return model(**{k: inputs[k] for k in keys if k in inputs})


def _check_common(ignore_index: int, model_kwargs: Sequence[str] | None) -> tuple[str, ...] | None:
    if not isinstance(ignore_index, int) or ignore_index >= 0:
        raise ValueError(
            f"`ignore_index` must be a negative int (a label no token has), got {ignore_index!r}."
        )
    if isinstance(model_kwargs, str):
        raise ValueError(
            f"`model_kwargs` must be a sequence of batch keys such as ('input_ids', "
            f"'attention_mask'), got the string {model_kwargs!r}."
        )
    return None if model_kwargs is None else tuple(model_kwargs)


class _TokenTask(Task):
    """Shared by the sequence tasks: dict batches of token ids, decoding for display."""

    decode: Decode | None
    model_kwargs: tuple[str, ...] | None

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """``model(input_ids)``, or ``model(**{k: batch[k] for k in model_kwargs})``."""
        return _logits(_call(model, inputs, self.model_kwargs))

    def batch_size(self, inputs: Any) -> int:
        """Number of sequences in the batch."""
        return int(inputs["input_ids"].shape[0])

    def describe(self, inputs: Mapping[str, Tensor]) -> str:
        """One example's tokens as text: through ``decode`` (padding dropped), else the ids."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is not None:
            ids = ids[mask.bool()]
        tokens = [int(t) for t in ids.reshape(-1).tolist()]
        return self.decode(tokens) if self.decode is not None else " ".join(map(str, tokens))


def _token_batch(batch: Any) -> tuple[dict[str, Tensor], Tensor | None]:
    """``({'input_ids', ['attention_mask']}, labels or None)`` from a tensor, tuple or dict."""
    if isinstance(batch, Tensor):
        return {"input_ids": batch}, None
    if (
        isinstance(batch, list | tuple)
        and 1 <= len(batch) <= 2
        and all(isinstance(t, Tensor) for t in batch)
    ):
        return {"input_ids": batch[0]}, (batch[1] if len(batch) == 2 else None)
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
        inputs = {"input_ids": batch["input_ids"]}
        if batch.get("attention_mask") is not None:
            inputs["attention_mask"] = batch["attention_mask"]
        return inputs, batch.get("labels")
    raise TaskError(
        f"Cannot read token ids from a batch of type {describe_structure(batch)}: expected a "
        "tensor of token ids [batch, length], a tuple (input_ids, labels), or a dict with "
        "'input_ids' (and optionally 'attention_mask' and 'labels'). Override `unpack` for other "
        "layouts."
    )


class LanguageModelingTask(_TokenTask):
    """Next-token prediction: one loss per sequence over the tokens that count.

    Batches are a tensor of token ids ``[batch, length]``, a tuple ``(input_ids, labels)``, or a
    dict with ``input_ids`` and optionally ``attention_mask`` and ``labels``. Without ``labels``,
    the labels are the input ids. Tokens labelled ``ignore_index``, or masked out by the
    ``attention_mask``, do not count.

    Args:
        reduction: ``"sum"`` (the default: the log-probability of the whole sequence, each token
            weighted alike) or ``"mean"`` (the mean over the tokens that count, as a training
            loss averaged per sequence would be).
        ignore_index: the label of tokens that do not count (prompt tokens of a completion,
            padding).
        shift: ``True`` when the logits at position ``t`` predict the label at ``t + 1`` (labels
            equal to the input ids, as in Hugging Face models); ``False`` when the labels are
            already the next tokens (a ``training_step`` that compares ``logits`` with
            ``labels`` position by position).
        model_kwargs: batch keys passed to the model as keywords, e.g. ``("input_ids",
            "attention_mask")``; ``None`` (the default) calls ``model(input_ids)``.
        decode: turns a list of token ids into text, for tables and logs.
        chunk_size: sequences differentiated at once in a batch of per-sample gradients
            (``None``: the whole batch). Activations grow with the length and the batch while
            the gradients kept do not, so the default, one at a time, keeps the memory of long
            sequences that of one sequence, for about 5-10% more time.

    Example:
        >>> import torch
        >>> task = LanguageModelingTask()
        >>> ids = torch.tensor([[1, 2, 3], [2, 3, 0]])
        >>> inputs, labels = task.unpack({"input_ids": ids,
        ...                               "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])})
        >>> labels
        tensor([[   1,    2,    3],
                [   2,    3, -100]])
        >>> logits = torch.zeros(2, 3, 4)  # uniform over 4 tokens
        >>> task.loss(logits, labels) / torch.log(torch.tensor(4.0))  # 2 tokens, then 1 token
        tensor([2., 1.])
    """

    def __init__(
        self,
        reduction: Literal["sum", "mean"] = "sum",
        ignore_index: int = IGNORE_INDEX,
        shift: bool = True,
        model_kwargs: Sequence[str] | None = None,
        decode: Decode | None = None,
        chunk_size: int | None = 1,
    ) -> None:
        if reduction not in ("sum", "mean"):
            raise ValueError(f"`reduction` must be 'sum' or 'mean', got {reduction!r}.")
        check_positive_int("chunk_size", chunk_size, allow_none=True)
        self.chunk_size = chunk_size
        self.model_kwargs = _check_common(ignore_index, model_kwargs)
        self.reduction, self.ignore_index, self.shift = reduction, ignore_index, shift
        self.decode = decode

    def unpack(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        """``(inputs, labels)``: the labels with masked positions set to ``ignore_index``."""
        inputs, labels = _token_batch(batch)
        labels = inputs["input_ids"] if labels is None else labels
        mask = inputs.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, self.ignore_index)
        return inputs, labels

    def token_losses(self, outputs: Any, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token losses and the mask of the tokens that count, both ``[batch, positions]``."""
        logits = _logits(outputs)
        if self.shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        if logits.shape[:2] != labels.shape[:2]:
            raise TaskError(
                f"Logits of shape {tuple(logits.shape)} do not match labels of shape "
                f"{tuple(labels.shape)} (shift={self.shift}). Set `shift` to match how the "
                "model's training_step aligns logits with labels."
            )
        counts = labels != self.ignore_index
        logp = F.log_softmax(logits, dim=-1)
        # A gather on clamped labels, then a mask: the same numbers as cross_entropy with
        # ignore_index, and it runs under torch.func.vmap.
        picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return -picked * counts, counts

    def loss(self, outputs: Any, targets: Any) -> Tensor:
        """Per-sequence loss: the sum, or the mean, of the token losses that count."""
        losses, counts = self.token_losses(outputs, targets)
        total = losses.sum(dim=1)
        if self.reduction == "sum":
            return total
        return total / counts.sum(dim=1).clamp_min(1).to(total.dtype)


class SequenceClassificationTask(_TokenTask):
    """Dict batches ``{input_ids, attention_mask, labels}`` and a classifier of whole sequences.

    The model returns logits ``[batch, classes]``, as a tensor, a dict or an object with
    ``.logits`` (Hugging Face's ``...ForSequenceClassification``); the loss is cross-entropy.

    Args:
        model_kwargs: batch keys passed to the model as keywords (those present in the batch);
            ``None`` calls ``model(input_ids)``.
        decode: turns a list of token ids into text, for tables and logs.

    Example:
        >>> import torch
        >>> task = SequenceClassificationTask()
        >>> inputs, labels = task.unpack({"input_ids": torch.tensor([[5, 6]]),
        ...                               "attention_mask": torch.tensor([[1, 1]]),
        ...                               "labels": torch.tensor([1])})
        >>> sorted(inputs), labels
        (['attention_mask', 'input_ids'], tensor([1]))
        >>> task.loss(torch.tensor([[0.0, 0.0]]), labels)
        tensor([0.6931])
    """

    def __init__(
        self,
        model_kwargs: Sequence[str] | None = ("input_ids", "attention_mask"),
        decode: Decode | None = None,
    ) -> None:
        self.model_kwargs = _check_common(IGNORE_INDEX, model_kwargs)
        self.decode = decode

    def unpack(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        """``(inputs, labels)`` from a dict batch with ``labels`` (or a tuple ``(ids, labels)``)."""
        inputs, labels = _token_batch(batch)
        if labels is None:
            raise TaskError(
                "A sequence-classification batch needs labels; got "
                f"{describe_structure(batch)}. Put the class of each sequence under 'labels' "
                "(shape [batch])."
            )
        return inputs, labels

    def loss(self, outputs: Any, targets: Any) -> Tensor:
        """Per-sequence cross-entropy."""
        return F.cross_entropy(_logits(outputs), targets, reduction="none")

    def predict(self, outputs: Any) -> Tensor | None:
        """The arg-max class."""
        return _logits(outputs).argmax(dim=-1)


def completion_example(
    prompt: Sequence[int] | Tensor,
    completion: Sequence[int] | Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Tensor]:
    """A query whose loss counts the completion only: ``input_ids`` = prompt + completion, and
    ``labels`` = ``ignore_index`` on the prompt, the completion's tokens after it.

    Example:
        >>> completion_example([7, 8, 9], [4])
        {'input_ids': tensor([7, 8, 9, 4]), 'labels': tensor([-100, -100, -100,    4])}
    """
    prompt_ids = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
    answer = torch.as_tensor(completion, dtype=torch.long).reshape(-1)
    if answer.numel() == 0:
        raise ValueError("`completion` is empty: give at least one token to score.")
    ids = torch.cat([prompt_ids, answer])
    labels = torch.cat([torch.full_like(prompt_ids, ignore_index), answer])
    return {"input_ids": ids, "labels": labels}


def pad_sequences(
    examples: Sequence[Mapping[str, Tensor]], pad_id: int = 0, ignore_index: int = IGNORE_INDEX
) -> dict[str, Tensor]:
    """Collate examples of different lengths: right-padded ``input_ids``, an ``attention_mask``,
    and ``labels`` (``ignore_index`` on padding); use it as a ``DataLoader``'s ``collate_fn``.

    Example:
        >>> examples = [completion_example([1, 2], [3]), {"input_ids": torch.tensor([5])}]
        >>> batch = pad_sequences(examples)
        >>> batch["input_ids"].tolist(), batch["labels"].tolist()
        ([[1, 2, 3], [5, 0, 0]], [[-100, -100, 3], [5, -100, -100]])
    """
    length = max(int(e["input_ids"].numel()) for e in examples)
    n = len(examples)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), ignore_index, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for row, example in enumerate(examples):
        seq = example["input_ids"].reshape(-1)
        k = seq.numel()
        ids[row, :k] = seq
        labels[row, :k] = example.get("labels", seq).reshape(-1)
        mask[row, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
