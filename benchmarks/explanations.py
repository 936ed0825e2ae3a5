"""How specific the explanations are: raw and relative rankings on the README's main job.

Trains the CNN of ``examples/digits_influence.py`` once, through that script's own ``train``
(scikit-learn's digits, 10% flipped labels, 8 epochs, 64 validation digits, the callback's
defaults), then measures the top ``k`` (8) helpful and harmful training digits of every
validation digit, ranked by raw score and by relative score (score / sqrt(self-influence)):

- ``label``: share of the helpful places whose training digit carries the validation digit's
  label (its given label, flipped or not);
- ``top SI helpful`` / ``harmful``: share of the places held by the 10% of training digits of
  highest self-influence; ``flipped helpful`` / ``harmful``: share held by flipped labels;
- ``distinct``: distinct training digits as a share of the helpful and the harmful places
  (counted in each list, then added), and of each list alone.

``--exact`` also solves self-influence exactly on the trained model (``Exact()``, 1,898
parameters) and prints the top-``k`` overlap of the relative rankings from the default
self-influence with those from the exact one.

    python benchmarks/explanations.py            # about 20 s on one thread; --exact adds ~10 s
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import replace
from typing import Any

import torch
from common import setup, table, write_json
from torch import Tensor

from lightning_influence import InfluenceResult

TARGETS = {"label": ">= 0.95", "top SI helpful": "<= 0.10", "distinct": ">= 0.70"}


def explanation_metrics(
    result: InfluenceResult,
    k: int = 8,
    relative: bool = False,
    flipped: Tensor | None = None,
    top_share: float = 0.1,
) -> dict[str, float]:
    """How specific the top-``k`` helpful and harmful lists of ``result`` are (see above);
    ``flipped`` holds the dataset indices of mislabeled training examples, when known.

    Example:
        >>> result = InfluenceResult(
        ...     scores=torch.tensor([[-1.0, 2.0], [-3.0, -2.0], [1.0, 0.5]]),
        ...     train_indices=torch.tensor([0, 1, 2]), val_indices=torch.tensor([0, 1]),
        ...     self_influence=torch.tensor([1.0, 9.0, 1.0]),
        ...     train_targets=torch.tensor([0, 1, 1]), val_targets=torch.tensor([0, 1]))
        >>> explanation_metrics(result, k=1)["label"], explanation_metrics(result, k=1)["distinct"]
        (0.5, 0.75)
        >>> explanation_metrics(result, k=1, relative=True)["label"]
        1.0
    """
    helpful = result.helpful(k, relative=relative).indices
    harmful = result.harmful(k, relative=relative).indices
    row = {int(i): n for n, i in enumerate(result.train_indices.tolist())}
    out: dict[str, float] = {}
    if result.train_targets is not None and result.val_targets is not None:
        labels = result.train_targets[[row[int(i)] for i in helpful.reshape(-1).tolist()]]
        out["label"] = float(
            (labels.reshape(helpful.shape) == result.val_targets[:, None]).mean(dtype=torch.float64)
        )
    if result.self_influence is not None:
        n_top = max(1, math.ceil(top_share * result.n_train))
        top = result.outliers(n_top).indices
        out["top SI helpful"] = float(torch.isin(helpful, top).double().mean())
        out["top SI harmful"] = float(torch.isin(harmful, top).double().mean())
    if flipped is not None:
        out["flipped helpful"] = float(torch.isin(helpful, flipped).double().mean())
        out["flipped harmful"] = float(torch.isin(harmful, flipped).double().mean())
    distinct_helpful, distinct_harmful = helpful.unique().numel(), harmful.unique().numel()
    out["distinct"] = (distinct_helpful + distinct_harmful) / (helpful.numel() + harmful.numel())
    out["distinct helpful"] = distinct_helpful / helpful.numel()
    out["distinct harmful"] = distinct_harmful / harmful.numel()
    return out


def _overlap(a: Tensor, b: Tensor) -> float:
    shared = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b, strict=True)]
    return sum(shared) / a.numel()


def exact_check(run: Any, k: int) -> list[dict[str, Any]]:
    """Relative rankings from the run's own self-influence against those from exact
    self-influence on the same scores, and against a fully exact solve."""
    from lightning_influence import Exact, compute_influence

    result = run.result
    exact = compute_influence(
        run.model,
        run.data.train_dataset,
        run.data.val_dataset,
        solver=Exact(),
        damping=result.damping,
        val_indices=result.val_indices.tolist(),
        progress=False,
    )
    assert torch.equal(exact.train_indices, result.train_indices)
    same_scores = replace(result, self_influence=exact.self_influence)
    si, ref = result.self_influence.double(), exact.self_influence.double()
    rows = []
    for name in ("helpful", "harmful"):
        ours = getattr(result, name)(k, relative=True).indices
        rows.append(
            {
                "list": name,
                "vs exact self-influence": _overlap(
                    ours, getattr(same_scores, name)(k, relative=True).indices
                ),
                "vs all exact": _overlap(ours, getattr(exact, name)(k, relative=True).indices),
                "SI pearson": float(torch.corrcoef(torch.stack([si, ref]))[0, 1]),
                "SI ratio median": float((si / ref).median()),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=8, help="places per list (default 8)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--exact", action="store_true", help="also solve self-influence exactly")
    args = parser.parse_args(argv)
    setup()
    from digits_influence import parse_args, train  # examples/, on the path after setup()

    with tempfile.TemporaryDirectory() as runs:
        job = parse_args(["--quiet", "--epochs", str(args.epochs), "--runs", runs])
        run = train(job)
    flipped = run.data.flipped
    rows = []
    for relative in (False, True):
        metrics = explanation_metrics(run.result, args.k, relative, flipped)
        rows.append({"ranking": "relative" if relative else "raw", **metrics})
    rows.append({"ranking": "target (relative)", **TARGETS})
    n_val = run.result.val_indices.numel()
    title = (
        f"Top {args.k} helpful and harmful training digits of {n_val} validation digits "
        f"({run.result.n_train} training digits, {flipped.numel()} flipped)"
    )
    columns = ["ranking", *(c for c in rows[0] if c != "ranking")]
    table(rows, columns, title)
    payload: dict[str, Any] = {"k": args.k, "epochs": args.epochs, "rows": rows}
    if args.exact:
        check = exact_check(run, args.k)
        table(check, list(check[0]), "Relative rankings: default self-influence against exact")
        payload["exact"] = check
    write_json("explanations", payload)


if __name__ == "__main__":
    main()
