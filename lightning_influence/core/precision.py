"""Lower-precision scoring: the autocast context of the training pass, and its checks.

The scoring pass (each training batch's forward and backward pass and its dot products with the
solved validation vectors) may run in bfloat16 or float16 under ``torch.autocast``. The solved
vectors are computed in the working precision (float32), and every sum that makes a score (over
layers, over the parameters the per-sample route covers, a self-influence's quadratic form) is
accumulated in it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch

__all__ = ["SCORING_DTYPES", "ScoringDTypeName", "check_scoring_dtype", "scoring_autocast"]

ScoringDTypeName = Literal["bfloat16", "float16"]
SCORING_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def scoring_autocast(
    device: torch.device, dtype: torch.dtype | None
) -> AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device``'s kind, or nothing when ``dtype`` is None.

    Example:
        >>> import torch
        >>> with scoring_autocast(torch.device("cpu"), torch.bfloat16):
        ...     (torch.ones(2, 3) @ torch.ones(3, 2)).dtype
        torch.bfloat16
    """
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def check_scoring_dtype(
    working: torch.dtype, device: torch.device, dtype: torch.dtype | None
) -> None:
    """Raise a ``ValueError`` naming ``scoring_dtype`` unless ``dtype`` can lower the scoring pass
    of a model held in ``working`` precision on ``device``.

    Example:
        >>> import torch
        >>> check_scoring_dtype(torch.float32, torch.device("cpu"), torch.bfloat16)
        >>> check_scoring_dtype(torch.float64, torch.device("cpu"), torch.bfloat16)
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `scoring_dtype='bfloat16'` lowers a float32 scoring pass, but ...
    """
    if dtype is None:
        return
    if dtype not in SCORING_DTYPES.values():
        raise ValueError(
            f"`scoring_dtype` must be one of {[None, *SCORING_DTYPES]}, got {dtype!r}."
        )
    name = repr(str(dtype).removeprefix("torch."))
    if working != torch.float32:
        raise ValueError(
            f"`scoring_dtype={name}` lowers a float32 scoring pass, but the working precision "
            f"is {working} (autocast leaves float64 alone). Pass scoring_dtype=None for a "
            "float64 reference run, or dtype='float32'."
        )
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(
            f"`scoring_dtype={name}` needs torch.autocast, which is not available on "
            f"{device.type!r} devices. Pass scoring_dtype=None, or move the model to a CPU or "
            "CUDA device."
        )
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(
            "`scoring_dtype='bfloat16'` is not supported by this GPU. Pass "
            "scoring_dtype='float16', or None for float32."
        )
