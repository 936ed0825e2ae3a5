"""Training and validation examples as text: a label or prediction, the fields of a tabular
input, a short description of any other input, a sequence's tokens with their shares."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

__all__ = [
    "describe_input",
    "format_label",
    "input_fields",
    "marked_tokens",
    "token_pieces",
    "token_window",
]

Tokens = tuple[tuple[str, float | None], ...]
"""Each token's text and its share of a score (``None``: the token has no loss)."""


def input_fields(x: Any, names: tuple[str, ...] | None) -> tuple[tuple[str, str], ...]:
    """(name, value) of each feature of one tabular input (a mapping or a flat sequence).

    Example:
        >>> import torch
        >>> input_fields(torch.tensor([0.5, 12.0]), ("age", "income"))
        (('age', '0.5'), ('income', '12'))
    """
    if isinstance(x, Mapping):
        return tuple((str(k), describe_input(v)) for k, v in x.items())
    values = x.detach().reshape(-1).tolist() if isinstance(x, Tensor) else list(x)
    names = names or tuple(f"x{n}" for n in range(len(values)))
    if len(names) != len(values):
        raise ValueError(
            f"`feature_names` names {len(names)} features but an input holds {len(values)}; "
            "give one name per feature."
        )
    return tuple(
        (n, f"{v:.4g}" if isinstance(v, float) else str(v))
        for n, v in zip(names, values, strict=True)
    )


def describe_input(x: Any) -> str:
    """A short text for one input: values of small tensors, shape and range of larger ones.

    Example:
        >>> import torch
        >>> describe_input(torch.tensor([1.0, 2.5]))
        '[1, 2.5]'
    """
    if isinstance(x, Tensor):
        flat = x.detach().float().reshape(-1)
        if flat.numel() <= 6:
            return "[" + ", ".join(f"{v:.3g}" for v in flat.tolist()) + "]"
        return (
            f"tensor{list(x.shape)} [{', '.join(f'{v:.3g}' for v in flat[:4].tolist())}, ...] "
            f"min {flat.min():.3g} max {flat.max():.3g}"
        )
    if isinstance(x, Mapping):
        return ", ".join(f"{k}: {describe_input(v)}" for k, v in x.items())
    text = str(x).replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def format_label(value: Tensor, names: tuple[str, ...] | None = None) -> str:
    """A label or prediction as text: its class name when ``names`` has one.

    Example:
        >>> import torch
        >>> format_label(torch.tensor(1), ("cat", "dog")), format_label(torch.tensor(0.25))
        ('dog', '0.25')
    """
    if value.numel() != 1:
        return str([round(v, 3) for v in value.reshape(-1).tolist()][:4])
    item = value.item()
    if isinstance(item, int) and names is not None and 0 <= item < len(names):
        return names[item]
    return str(item) if isinstance(item, int | bool) else f"{item:.3g}"


def token_pieces(
    x: Any, shares: Tensor, decode: Callable[[list[int]], str] | None = None
) -> Tokens:
    """The tokens of one sequence input (``input_ids``, in a dict with an ``attention_mask`` or
    alone) with their ``shares`` (per position, NaN: no loss), written so that joined they read
    as the whole (``decode`` of each token, spaced as ``decode`` spaces them; else the ids).

    Example:
        >>> import torch
        >>> x = {"input_ids": torch.tensor([3, 4, 0]), "attention_mask": torch.tensor([1, 1, 0])}
        >>> words = lambda ids: " ".join(f"w{i}" for i in ids)
        >>> token_pieces(x, torch.tensor([float("nan"), -0.5, 0.0]), words)
        (('w3', None), (' w4', -0.5))
    """
    ids = x.get("input_ids") if isinstance(x, Mapping) else x
    if not isinstance(ids, Tensor):
        return ()
    mask = x.get("attention_mask") if isinstance(x, Mapping) else None
    flat = ids.reshape(-1)
    kept = [
        t
        for t in range(flat.numel())
        if mask is None or bool(mask.reshape(-1)[t])  # padding is not shown
    ]
    tokens = [int(flat[t]) for t in kept]
    pieces = [decode([t]) for t in tokens] if decode is not None else [str(t) for t in tokens]
    whole = decode(tokens) if decode is not None else " ".join(pieces)
    if whole != "".join(pieces):  # a separator between tokens (a space, for words)
        sep = next((c for c in (" ", "-", "") if whole == c.join(pieces)), " ")
        pieces = [p if n == 0 else sep + p for n, p in enumerate(pieces)]
    values = [float(shares[t]) if t < shares.numel() else math.nan for t in kept]
    return tuple((p, v if math.isfinite(v) else None) for p, v in zip(pieces, values, strict=True))


def marked_tokens(tokens: Tokens, score: float, most: int = 3) -> str:
    """The text with the ``most`` tokens that carry the largest shares of ``score`` (each at
    least a tenth of it) in brackets, with their percentage of it.

    Example:
        >>> marked_tokens((("the", None), (" capital", -0.1), (" naror", -1.8)), -2.0)
        'the capital [naror 90%]'
    """
    ranked = sorted(
        (n for n, (_, v) in enumerate(tokens) if v is not None and score and v / score >= 0.1),
        key=lambda n: -(tokens[n][1] or 0.0) / score,
    )[:most]
    out = []
    for n, (piece, value) in enumerate(tokens):
        if n in ranked and value is not None:
            word = piece.lstrip()
            out.append(f"{piece[: len(piece) - len(word)]}[{word} {value / score:.0%}]")
        else:
            out.append(piece)
    return "".join(out)


def token_window(tokens: Tokens, size: int = 64) -> Tokens:
    """At most ``size`` tokens from a little before the one with the largest share (an eighth
    of them before it, so that a card's first lines show it), with ``"..."`` where tokens are
    left out: what a card shows of a long sequence.

    Example:
        >>> tokens = tuple((f" t{n}", 1.0 if n == 50 else 0.0) for n in range(100))
        >>> [p for p, _ in token_window(tokens, 16)]  # doctest: +NORMALIZE_WHITESPACE
        ['...', ' t48', ' t49', ' t50', ' t51', ' t52', ' t53', ' t54', ' t55', ' t56', ' t57',
         ' t58', ' t59', ' t60', ' t61', ' t62', ' t63', ' ...']
    """
    if len(tokens) <= size:
        return tokens
    top = max(range(len(tokens)), key=lambda n: abs(tokens[n][1] or 0.0))
    start = min(max(top - size // 8, 0), len(tokens) - size)
    before: Tokens = (("...", None),) if start > 0 else ()
    after: Tokens = ((" ...", None),) if start + size < len(tokens) else ()
    return before + tokens[start : start + size] + after
