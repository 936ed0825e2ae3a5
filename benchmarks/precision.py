"""Scoring in bfloat16 / float16 (``scoring_dtype``) against float32: throughput and agreement.

Two models, each with one ``LowRank()`` factorization of the damped Gauss-Newton curvature
computed once in float32 that solves the validation vectors and serves self-influence (as
``compute_influence(solver=LowRank())`` does); then the scoring pass over the training set
(``example_pass``, layer-wise route, batches of 64) in float32, bfloat16 and float16,
interleaved, best of ``--repeats``. The solve is outside the comparison: only the scoring pass
changes precision.

- the digits CNN of ``examples/digits.py`` (1,898 parameters), trained with Lightning for 8
  epochs as ``lissa.py --cnn`` does; 1,200 training and 64 validation points, damping 1e-3;
- the 1M-parameter synthetic MLP of ``synthetic.py`` (``100 -> 9000 -> 10``), three SGD epochs
  on 2,000 points (``--n-mlp``), 8 validation points, damping 1e-3.

Per dtype: examples per second and its ratio to float32 (same run), and Pearson / Spearman /
top-10 overlap (by absolute value, per validation point) of the scores and of self-influence
against float32. Prints a markdown table, writes ``benchmarks/results/precision.json``. One
thread.

Usage::

    python benchmarks/precision.py          # ~3 min on one thread
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from common import agreement, setup, table, write_json
from synthetic import HIDDEN_1M, sgd_epoch, stacked, wide_mlp

from lightning_influence import (
    ClassificationTask,
    FunctionalModel,
    InfluenceConfig,
    LowRank,
    as_indexed,
)
from lightning_influence.core.curvature import Curvature
from lightning_influence.core.scores import example_pass

DTYPES: dict[str, torch.dtype | None] = {
    "float32": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _digits_cnn() -> tuple[nn.Module, TensorDataset, TensorDataset]:
    import lightning as L
    from digits import DigitsCNN, DigitsDataModule

    L.seed_everything(0, verbose=False)
    data, cnn = DigitsDataModule(), DigitsCNN()
    trainer = L.Trainer(max_epochs=8, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(cnn, data)
    val = data.val_dataset
    chosen = InfluenceConfig(num_val=64).choose_val(len(val))  # as the callback draws them
    return cnn.net.eval(), data.train_dataset, TensorDataset(*val[chosen])


def _synthetic_mlp(n_train: int) -> tuple[nn.Module, TensorDataset, TensorDataset]:
    train, val = stacked(n_train, 0), stacked(8, 1)
    model = wide_mlp(HIDDEN_1M)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        sgd_epoch(model, DataLoader(train, batch_size=64, shuffle=True, generator=gen), opt)
    return model.eval(), train, val


def _compare(
    name: str, model: nn.Module, train: TensorDataset, val: TensorDataset, repeats: int
) -> list[dict[str, Any]]:
    damping = 1e-3
    fm = FunctionalModel(model, ClassificationTask())
    data = as_indexed(train, batch_size=64)
    curv = Curvature(fm, data.rebatched(1024), "gauss_newton")
    start = time.perf_counter()
    grads = example_pass(fm, as_indexed(val, batch_size=64), keep_gradients=True).gradients
    assert grads is not None
    with warnings.catch_warnings():  # at 1M parameters the rank is bounded by `max_memory`
        warnings.simplefilter("ignore")
        inverse, _ = LowRank().factorize(curv, damping)
    val_inverse = inverse(grads)
    solve_s = time.perf_counter() - start
    print(f"{name}: {fm.n_params:,} parameters, solved in {solve_s:.1f} s", flush=True)

    example_pass(fm, data.subset(data.indices[:64]), val_inverse, inverse)  # warm-up
    best: dict[str, float] = {key: float("inf") for key in DTYPES}
    passes: dict[str, Any] = {}
    for _ in range(repeats):  # interleaved, so that a busy machine slows every dtype alike
        for key, dtype in DTYPES.items():
            start = time.perf_counter()
            passes[key] = example_pass(fm, data, val_inverse, inverse, scoring_dtype=dtype)
            best[key] = min(best[key], time.perf_counter() - start)
    ref = passes["float32"]
    rows = []
    for key in DTYPES:
        scored = passes[key]
        scores, self_influence = (
            agreement(ref.scores, scored.scores),
            agreement(ref.self_influence, scored.self_influence),
        )
        rows.append(
            {
                "model": name,
                "n_params": fm.n_params,
                "n_train": len(data),
                "n_val": int(val_inverse.shape[0]),
                "self_influence_rank": int(inverse.rank),
                "dtype": key,
                "examples_per_s": len(data) / best[key],
                "speedup": best["float32"] / best[key],
                "scores_pearson": scores["pearson"],
                "scores_spearman": scores["spearman"],
                "scores_top10": scores["top10"],
                "scores_max_relative_error": _relative(ref.scores, scored.scores),
                "self_pearson": self_influence["pearson"],
                "self_spearman": self_influence["spearman"],
                "self_top10": self_influence["top10"],
                "self_max_relative_error": _relative(ref.self_influence, scored.self_influence),
                "solve_s": solve_s,
            }
        )
    return rows


def _relative(ref: Tensor, est: Tensor) -> float:
    return float((est - ref).abs().max() / ref.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-mlp", type=int, default=2000, help="training points of the MLP")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per dtype")
    args = parser.parse_args()
    setup(threads=1)
    rows = _compare("digits CNN", *_digits_cnn(), args.repeats)
    rows += _compare("1M-parameter MLP", *_synthetic_mlp(args.n_mlp), args.repeats)
    columns = [
        "model",
        "dtype",
        "examples_per_s",
        "speedup",
        "scores_pearson",
        "scores_spearman",
        "scores_top10",
        "self_spearman",
        "self_top10",
    ]
    table(rows, columns, "Scoring pass in lower precision against float32 (one thread)")
    write_json("precision", {"repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
