"""Detection metrics against hand-computed values and scikit-learn."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from lightning_influence import detection_metrics


def _mask(n: int, positions: list[int]) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[positions] = True
    return mask


def test_hand_computed_case() -> None:
    # Ranking 0..9 by score; mislabeled at ranks 1, 3 and 6 (positions 0, 2, 5).
    scores = torch.linspace(0.9, 0.0, 10)
    bad = _mask(10, [0, 2, 5])
    out = detection_metrics(scores, bad, fractions=(0.1, 0.2, 0.3, 0.6))
    # Correctly ordered (bad, clean) pairs: 7 + 6 + 4 of 3 * 7.
    assert out["auroc"] == pytest.approx(17 / 21, abs=1e-6)
    # Precision at each bad example's rank: 1/1, 2/3, 3/6.
    assert out["average_precision"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3, abs=1e-6)
    assert out["recall@10%"] == pytest.approx(1 / 3)
    assert out["recall@20%"] == pytest.approx(1 / 3)
    assert out["recall@30%"] == pytest.approx(2 / 3)
    assert out["recall@60%"] == pytest.approx(1.0)
    assert list(out) == [
        "auroc",
        "average_precision",
        "recall@10%",
        "recall@20%",
        "recall@30%",
        "recall@60%",
    ]


def test_matches_scikit_learn_with_ties_and_large_scores() -> None:
    gen = torch.Generator().manual_seed(0)
    # Rounded scores create ties; the 1e6 offset would saturate a sigmoid applied to raw scores.
    scores = 1e6 + torch.round(torch.randn(300, generator=gen, dtype=torch.float64) * 4) * 1e3
    bad = torch.rand(300, generator=gen) < 0.15
    out = detection_metrics(scores, bad)
    assert out["auroc"] == pytest.approx(roc_auc_score(bad.numpy(), scores.numpy()), abs=1e-6)
    assert out["average_precision"] == pytest.approx(
        average_precision_score(bad.numpy(), scores.numpy()), abs=1e-6
    )
    top = torch.sort(-scores, stable=True).indices[:30]
    assert out["recall@10%"] == pytest.approx(float(bad[top].sum()) / float(bad.sum()))


def test_perfect_and_reversed_rankings() -> None:
    bad = _mask(20, [3, 7])
    scores = bad.double() + 0.01 * torch.arange(20)
    assert detection_metrics(scores, bad)["auroc"] == pytest.approx(1.0)
    assert detection_metrics(scores, bad)["recall@10%"] == pytest.approx(1.0)
    assert detection_metrics(-scores, bad)["auroc"] == pytest.approx(0.0)
    # 0/1 integer masks and lists are accepted too.
    assert detection_metrics(scores.tolist(), bad.long())["auroc"] == pytest.approx(1.0)


def test_errors_name_the_argument() -> None:
    scores = torch.arange(5.0)
    with pytest.raises(ValueError, match=r"is_mislabeled.*shape"):
        detection_metrics(scores, torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="both mislabeled and clean"):
        detection_metrics(scores, torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean mask"):
        detection_metrics(scores, torch.tensor([0, 2, 0, 0, 1]))
    with pytest.raises(ValueError, match="fractions"):
        detection_metrics(scores, _mask(5, [1]), fractions=(0.0,))
    with pytest.raises(ValueError, match="NaN"):
        detection_metrics(torch.tensor([0.0, float("nan"), 1.0]), _mask(3, [1]))
    with pytest.raises(ValueError, match="scores"):
        detection_metrics(torch.zeros(2, 2), _mask(4, [1]))
