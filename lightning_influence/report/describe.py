"""Training and validation examples as text: a label or prediction, the fields of a tabular
input, a short description of any other input."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["describe_input", "format_label", "input_fields"]


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
