"""The result of an influence computation: scores, rankings, and a safe file format."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["SELF_INFLUENCE_FLOOR", "InfluenceResult", "Ranking", "relative_denominators"]

_TENSOR_FIELDS = (
    "scores",
    "train_indices",
    "val_indices",
    "self_influence",
    "train_losses",
    "train_targets",
    "train_predictions",
    "val_losses",
    "val_targets",
    "val_predictions",
    "perturbation",
    "perturbation_indices",
    "token_shares",
    "token_share_indices",
)
# Fields with one row per training example, in the order of `train_indices`.
ROW_FIELDS = (
    "scores",
    "train_indices",
    "self_influence",
    "train_losses",
    "train_targets",
    "train_predictions",
)
_FORMAT = "lightning-influence/1"
# Relative influence divides by sqrt(self-influence); self-influence below this share of the
# largest one (zero for a zero gradient, negative from an indefinite or approximate inverse) is
# raised to it, so every relative score stays finite.
SELF_INFLUENCE_FLOOR = 1e-6


def relative_denominators(self_influence: Tensor) -> Tensor:
    """``sqrt(self_influence)``, each value at least ``SELF_INFLUENCE_FLOOR`` times the largest
    (and above zero): what relative influence divides each training example's scores by.

    Example:
        >>> relative_denominators(torch.tensor([4.0, 0.0, -1.0]))
        tensor([2.0000, 0.0020, 0.0020])
    """
    values = self_influence.detach()
    if values.numel() == 0:
        return values
    floor = max(SELF_INFLUENCE_FLOOR * float(values.max()), torch.finfo(values.dtype).tiny)
    return values.clamp_min(floor).sqrt()


class Ranking(NamedTuple):
    """Training examples ranked by a score: dataset indices and the scores, best first.

    Example:
        >>> Ranking(torch.tensor([[4, 1]]), torch.tensor([[-0.5, -0.25]]))
        Ranking(1 row, best first)
          row 0: 4 (-0.5), 1 (-0.25)
    """

    indices: Tensor
    scores: Tensor

    def __repr__(self) -> str:
        if self.indices.numel() == 0:
            return "Ranking(empty)"
        indices, scores = self.indices.reshape(-1, self.indices.shape[-1]), self.scores
        scores = scores.reshape(indices.shape)
        rows = indices.shape[0]
        lines = [f"Ranking({rows} row{'s' if rows != 1 else ''}, best first)"]
        for r in range(min(rows, 10)):
            pairs = ", ".join(
                f"{int(i)} ({float(v):.4g})" for i, v in zip(indices[r], scores[r], strict=True)
            )
            lines.append(f"  row {r}: {pairs}")
        if rows > 10:
            lines.append(f"  ... {rows - 10} more rows")
        return "\n".join(lines)


@dataclass
class InfluenceResult:
    """Influence of training examples on validation examples.

    ``scores[i, j]`` is Koh & Liang's influence on the loss,
    ``I_up,loss(z_i, z_val_j) = -g_val_j^T (H + damping I)^-1 g_i``.
    **Positive = harmful** (upweighting training example ``i`` raises the loss of validation
    example ``j``), negative = helpful. Rows follow ``train_indices`` and columns ``val_indices``,
    both dataset indices. ``perturbation[j, c]`` (when computed) is ``I_pert,loss`` of training
    example ``perturbation_indices[j, c]`` on validation example ``j``, shaped like one input:
    columns hold the ``k`` most helpful, then the ``k`` most harmful training examples.
    ``token_shares[j, c, t]`` (language-model tasks) is the share of token ``t``'s loss in the
    score of training example ``token_share_indices[j, c]`` on validation example ``j`` (NaN
    where a token has no loss; they sum to the score), for the examples shown: see
    :meth:`token_shares_of`.

    Example:
        >>> import torch
        >>> result = InfluenceResult(
        ...     scores=torch.tensor([[-2.0, 1.0], [3.0, -1.0], [0.5, -0.5]]),
        ...     train_indices=torch.tensor([10, 11, 12]), val_indices=torch.tensor([7, 8]),
        ...     self_influence=torch.tensor([0.1, 5.0, 0.2]))
        >>> result.helpful(k=1).indices      # most helpful training example for each val point
        tensor([[10],
                [11]])
        >>> result.outliers(k=2).indices     # highest self-influence first
        tensor([11, 12])
        >>> result.helpful(k=1, relative=True).indices  # per unit of self-influence: 12, not 11
        tensor([[10],
                [12]])
    """

    scores: Tensor
    train_indices: Tensor
    val_indices: Tensor
    self_influence: Tensor | None = None
    train_losses: Tensor | None = None
    train_targets: Tensor | None = None
    train_predictions: Tensor | None = None
    val_losses: Tensor | None = None
    val_targets: Tensor | None = None
    val_predictions: Tensor | None = None
    perturbation: Tensor | None = None
    perturbation_indices: Tensor | None = None
    token_shares: Tensor | None = None
    token_share_indices: Tensor | None = None
    damping: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_train, n_val = self.train_indices.numel(), self.val_indices.numel()
        if tuple(self.scores.shape) != (n_train, n_val):
            raise ValueError(
                f"`scores` has shape {tuple(self.scores.shape)}, expected ({n_train}, {n_val}) "
                "from train_indices and val_indices."
            )

    @property
    def n_train(self) -> int:
        """Number of training examples scored."""
        return int(self.train_indices.numel())

    @property
    def removal_effect(self) -> Tensor:
        """Predicted change of each validation loss when one training example is removed.

        ``-scores / n_train`` (first order): positive means removing the example raises the loss.
        """
        return -self.scores / self.n_train

    def _column(self, val_index: int | None) -> slice | Tensor:
        if val_index is None:
            return slice(None)
        hits = (self.val_indices == val_index).nonzero().flatten()
        if hits.numel() == 0:
            raise KeyError(f"Validation dataset index {val_index} is not in `val_indices`.")
        return hits[:1]

    @property
    def relative_scores(self) -> Tensor:
        """Relative influence (RelatIF, loss-relative): ``scores / sqrt(self_influence)``.

        Raw scores favour training examples with large gradients (outliers, mislabels), so the
        same few lead every validation point's ranking; dividing each row by the square root of
        the example's self-influence ranks the examples most specific to each validation point
        (Barshan, Brunet and Dziugaite, AISTATS 2020). Same shape and sign as ``scores``;
        self-influence is floored at ``SELF_INFLUENCE_FLOOR`` times its largest value. Derived
        on each call from ``scores`` and ``self_influence``, so a loaded result has it too.

        Raises:
            InfluenceError: when ``self_influence`` was not computed.
        """
        if self.self_influence is None:
            from lightning_influence.errors import InfluenceError  # keeps this module light

            raise InfluenceError(
                "Relative influence divides each score by the square root of the training "
                "example's self-influence, which this result does not hold: compute it with "
                "`self_influence=True` (the default of InfluenceCallback and compute_influence)."
            )
        denominators = relative_denominators(self.self_influence).to(self.scores)
        return self.scores / denominators[:, None]

    def _ranked(self, k: int, val_index: int | None, relative: bool, largest: bool) -> Ranking:
        scores = self.relative_scores if relative else self.scores
        values, pos = torch.topk(
            scores[:, self._column(val_index)].T, min(k, self.n_train), dim=1, largest=largest
        )
        return Ranking(self.train_indices[pos], values)

    def helpful(self, k: int = 10, val_index: int | None = None, relative: bool = False) -> Ranking:
        """The ``k`` most helpful training examples per validation point (most negative scores).

        Shapes ``[n_val, k]`` (or ``[1, k]`` for one ``val_index``, a dataset index). With
        ``relative=True`` ranked by, and holding, :attr:`relative_scores`: the examples that
        help this validation point most for their self-influence, not those that move the
        model most everywhere.
        """
        return self._ranked(k, val_index, relative, largest=False)

    def harmful(self, k: int = 10, val_index: int | None = None, relative: bool = False) -> Ranking:
        """The ``k`` most harmful training examples per validation point (most positive scores);
        ``relative=True`` as in :meth:`helpful`."""
        return self._ranked(k, val_index, relative, largest=True)

    def token_shares_of(self, train_index: int, val_index: int) -> Tensor | None:
        """Each token's share of the score of training example ``train_index`` on validation
        example ``val_index`` (dataset indices), ``[length]``: NaN where a token has no loss, the
        rest summing to the score. ``None`` where not computed: not a language-model task,
        ``token_k=0``, or an example not among those shown for this validation point."""
        from lightning_influence.core.tokens import token_shares_of  # keeps this module light

        column = self._column(val_index)
        assert isinstance(column, Tensor)
        shares, shown = self.token_shares, self.token_share_indices
        return token_shares_of(shares, shown, int(column[0]), train_index)

    def outliers(self, k: int = 10) -> Ranking:
        """The ``k`` training examples with the highest self-influence: suspected mislabels."""
        if self.self_influence is None:
            raise ValueError("Self-influence was not computed; pass `self_influence=True`.")
        values, pos = torch.topk(self.self_influence, min(k, self.n_train))
        return Ranking(self.train_indices[pos], values)

    @property
    def perturbation_k(self) -> int:
        """How many helpful (and as many harmful) examples have perturbation maps."""
        return 0 if self.perturbation_indices is None else self.perturbation_indices.shape[1] // 2

    @classmethod
    def merge(cls, parts: list[InfluenceResult]) -> InfluenceResult:
        """Join results computed on disjoint shards of the training set (e.g. one per process).

        Rows are sorted by dataset index and duplicates (a padded sampler) are dropped. The
        perturbation maps are re-ranked: the global top-k of each validation point is always among
        the shards' own top-k.
        """
        first = parts[0]
        indices = torch.cat([p.train_indices for p in parts])
        order = torch.argsort(indices, stable=True)
        keep = torch.ones_like(order, dtype=torch.bool)
        keep[1:] = indices[order][1:] != indices[order][:-1]
        rows = order[keep]

        def rows_of(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)[rows]

        merged: dict[str, Any] = {name: rows_of(name) for name in ROW_FIELDS}
        merged["train_indices"] = indices[rows]
        merged["perturbation"], merged["perturbation_indices"] = _merge_perturbations(parts)
        from lightning_influence.core.tokens import merge_token_shares  # keeps this module light

        merged["token_shares"], merged["token_share_indices"] = merge_token_shares(
            [p.token_shares for p in parts], [p.token_share_indices for p in parts]
        )
        # everything else (validation columns, damping, settings) is the same on every shard
        return replace(first, **merged)

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (tensors and JSON settings; no pickled code)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: getattr(self, name).detach().cpu()
            for name in _TENSOR_FIELDS
            if getattr(self, name) is not None
        }
        meta = {"damping": self.damping, "settings": self.settings, "diagnostics": self.diagnostics}
        torch.save({"format": _FORMAT, "tensors": tensors, "meta": json.dumps(meta)}, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> InfluenceResult:
        """Read a file written by :meth:`save`; never unpickles code (``weights_only=True``)."""
        try:
            blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # truncated, corrupt, or some other file
            raise ValueError(
                f"{path} is not a lightning-influence result file (truncated or corrupt?): {err}"
            ) from err
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a lightning-influence result file.")
        try:
            return cls(**blob["tensors"], **json.loads(blob["meta"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path} is not a complete lightning-influence result file: {err}"
            ) from err

    def equals(self, other: InfluenceResult) -> bool:
        """Exact equality of every tensor (NaN equal to NaN) and setting."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, Tensor) or isinstance(b, Tensor):
                if a is None or b is None or a.dtype != b.dtype or a.shape != b.shape:
                    return False
                if not torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)) or not torch.equal(
                    a.isnan(), b.isnan()
                ):
                    return False
            elif a != b:
                return False
        return True


def _merge_perturbations(parts: list[InfluenceResult]) -> tuple[Tensor | None, Tensor | None]:
    if any(p.perturbation is None or p.perturbation_indices is None for p in parts):
        return None, None
    k = parts[0].perturbation_k
    cand_idx = torch.cat([p.perturbation_indices for p in parts], dim=1)  # type: ignore[misc]
    cand_map = torch.cat([p.perturbation for p in parts], dim=1)  # type: ignore[misc]
    cand_score = torch.cat(
        [_pair_scores(p, p.perturbation_indices) for p in parts],  # type: ignore[arg-type]
        dim=1,
    )
    helpful = torch.topk(cand_score, k, dim=1, largest=False).indices
    harmful = torch.topk(cand_score, k, dim=1, largest=True).indices
    pick = torch.cat([helpful, harmful], dim=1)
    rows = torch.arange(pick.shape[0])[:, None]
    return cand_map[rows, pick], cand_idx[rows, pick]


def _pair_scores(result: InfluenceResult, train_index: Tensor) -> Tensor:
    """``scores`` of (training dataset index, validation position) pairs."""
    pos = torch.searchsorted(result.train_indices.sort().values, train_index)
    order = result.train_indices.argsort()
    cols = torch.arange(train_index.shape[0])[:, None].expand_as(train_index)
    return result.scores[order[pos], cols]
