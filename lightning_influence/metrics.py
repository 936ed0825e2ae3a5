"""How well a ranking finds known-bad labels: AUROC, average precision, recall at a fraction.

``detection_metrics`` scores any ranking (self-influence, training loss, gradient norm, ...) of
the training examples against a mask of the examples known to be mislabeled. Higher score means
more suspicious. AUROC and average precision come from torchmetrics; "recall at 10%" is the
share of all mislabeled examples found among the top 10% of the ranking (what a reviewer who
checks that many examples would find).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

__all__ = ["detection_metrics"]


def detection_metrics(
    scores: Tensor | Sequence[float],
    is_mislabeled: Tensor | Sequence[bool],
    fractions: Sequence[float] = (0.1, 0.2),
) -> dict[str, float]:
    """Score a ranking of training examples against the known mislabeled ones.

    Args:
        scores: one score per example, ``[n]``; higher means more likely mislabeled
            (``result.self_influence``, a training loss, ...).
        is_mislabeled: boolean mask ``[n]``, ``True`` where the label is known to be wrong. From
            positions ``idx``: ``mask = torch.zeros(n, dtype=torch.bool); mask[idx] = True``.
        fractions: check the top ``round(f * n)`` examples of the ranking for each ``f`` in
            ``(0, 1]``; ties are broken by position.

    Returns:
        ``{"auroc", "average_precision", "recall@10%", "recall@20%", ...}``: recall at ``f`` is
        the share of the mislabeled examples among the top ``round(f * n)``.

    Example:
        >>> import torch
        >>> scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
        >>> bad = torch.zeros(10, dtype=torch.bool)
        >>> bad[[0, 2, 5]] = True
        >>> metrics = detection_metrics(scores, bad, fractions=(0.1, 0.3))
        >>> {k: round(v, 4) for k, v in metrics.items()}
        {'auroc': 0.8095, 'average_precision': 0.7222, 'recall@10%': 0.3333, 'recall@30%': 0.6667}
    """
    s = torch.as_tensor(scores).detach().cpu().to(torch.float64)
    bad = torch.as_tensor(is_mislabeled).detach().cpu()
    if s.ndim != 1:
        raise ValueError(
            f"`scores` must be one score per example, shape [n]; got {tuple(s.shape)}."
        )
    if bad.shape != s.shape:
        raise ValueError(
            f"`is_mislabeled` must have the shape of `scores` {tuple(s.shape)}; got "
            f"{tuple(bad.shape)}. Pass a boolean mask, not a list of positions."
        )
    if bad.dtype != torch.bool:
        if not bool(((bad == 0) | (bad == 1)).all()):
            raise ValueError(
                "`is_mislabeled` must be a boolean mask (or 0/1); got values "
                f"{torch.unique(bad)[:10].tolist()}. From positions `idx` build "
                "`mask = torch.zeros(n, dtype=torch.bool); mask[idx] = True`."
            )
        bad = bad.bool()
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"`scores` contains {int((~torch.isfinite(s)).sum())} NaN or Inf values.")
    n_bad = int(bad.sum())
    if n_bad == 0 or n_bad == len(s):
        raise ValueError(
            f"`is_mislabeled` marks {n_bad} of {len(s)} examples; AUROC needs both mislabeled "
            "and clean examples."
        )
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"`fractions` must lie in (0, 1]; got {f}.")
    # Dense ranks in [0, 1]: monotone in the scores, ties kept, never saturated (torchmetrics
    # would apply a sigmoid to raw scores outside [0, 1], which ties large scores together).
    unique, rank = torch.unique(s, return_inverse=True)
    preds = rank.to(torch.float64) / max(len(unique) - 1, 1)
    target = bad.long()
    out = {
        "auroc": float(binary_auroc(preds, target)),
        "average_precision": float(binary_average_precision(preds, target)),
    }
    order = torch.sort(-s, stable=True).indices
    for f in fractions:
        k = max(1, round(f * len(s)))
        out[f"recall@{100 * f:g}%"] = float(bad[order[:k]].sum()) / n_bad
    return out
