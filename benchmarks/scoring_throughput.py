"""Scoring throughput: examples per second of the training pass, layer-wise vs per-sample (vmap).

The model is the 1M-parameter synthetic MLP of ``synthetic.py`` (``100 -> 9000 -> 10``, 999,010
parameters), scored in batches of 64 against 8 solved validation vectors (random rows: the
pass's cost does not depend on their values). Three passes over the same pre-generated examples:

- ``layerwise``: ``example_pass`` as the package runs it (``nn.Linear`` factors from one forward
  and one backward pass per batch);
- ``layerwise + self-influence``: the same with a rank-16 low-rank inverse (the eigenvectors are
  extra rows);
- ``vmap``: the per-sample path, ``[batch, p]`` gradients from ``vmap(grad)``, on fewer examples
  (it is the slow one); the layer-wise route is switched off for it.

The scores of the two routes are compared on the examples both scored. ``--cnn`` adds the same
comparison for the digits CNN of ``examples/digits.py`` (two 3x3 convolutions and a linear head,
1,898 parameters at 8 channels) on random 8x8 images against 64 validation rows. With
``--ratio`` it also runs ``synthetic.py`` for one SGD epoch and one influence run (10,000 points,
8 validation points, LiSSA as in ``scaling.py``), each in its own process, and prints their
ratio. One thread.

Usage::

    python benchmarks/scoring_throughput.py            # ~1 min
    python benchmarks/scoring_throughput.py --ratio    # plus the influence / epoch ratio
    python benchmarks/scoring_throughput.py --cnn      # plus the digits CNN

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import run_child
from synthetic import HIDDEN_1M, stacked, wide_mlp
from torch import nn
from torch.utils.data import TensorDataset

import lightning_influence.core.scores as scores_module
from lightning_influence import ClassificationTask, FunctionalModel, as_indexed
from lightning_influence.core.scores import example_pass
from lightning_influence.solvers.lowrank import LowRankInverse

HERE = Path(__file__).resolve().parent


def _timed_pass(
    fm: FunctionalModel, data: TensorDataset, n: int, val_inverse: torch.Tensor, **kwargs: Any
) -> tuple[float, torch.Tensor | None]:
    indexed = as_indexed(data, torch.arange(n), batch_size=64)
    example_pass(fm, as_indexed(data, torch.arange(64), batch_size=64), val_inverse, **kwargs)
    start = time.perf_counter()
    scored = example_pass(fm, indexed, val_inverse, **kwargs)
    return n / (time.perf_counter() - start), scored.scores


def _vmap_rate(
    fm: FunctionalModel, data: TensorDataset, n: int, val_inverse: torch.Tensor
) -> tuple[float, torch.Tensor | None]:
    """Examples per second of the per-sample route (the layer-wise one switched off)."""
    switch = scores_module._layerwise
    scores_module._layerwise = lambda *_args, **_kwargs: None
    try:
        return _timed_pass(fm, data, n, val_inverse)
    finally:
        scores_module._layerwise = switch


def _digits_cnn(channels: int = 8) -> nn.Module:
    """The examples' digits CNN, seeded."""
    sys.path.insert(0, str(HERE.parent / "examples"))
    from digits import DigitsCNN

    torch.manual_seed(0)
    return DigitsCNN(channels=channels).net


def _cnn(results: dict[str, Any]) -> None:
    fm = FunctionalModel(_digits_cnn().eval(), ClassificationTask())
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4000, 1, 8, 8, generator=gen), torch.randint(0, 10, (4000,)))
    val_inverse = torch.randn(64, fm.n_params, generator=gen)
    layerwise, scores = _timed_pass(fm, data, 4000, val_inverse)
    vmap, reference = _vmap_rate(fm, data, 2000, val_inverse)
    assert scores is not None and reference is not None
    results["cnn"] = {
        "n_params": fm.n_params,
        "n_val": 64,
        "layerwise_examples_per_s": layerwise,
        "vmap_examples_per_s": vmap,
        "max_relative_difference": float(
            (scores[:2000] - reference).abs().max() / reference.abs().max()
        ),
    }
    print(
        f"digits CNN ({fm.n_params} parameters, 64 validation rows): layer-wise "
        f"{layerwise:.0f} examples/s, vmap {vmap:.0f} examples/s ({layerwise / vmap:.1f}x); "
        f"scores differ by at most {results['cnn']['max_relative_difference']:.1e}"
    )


def _child(mode: str) -> dict[str, Any]:
    extra = ["--scale", "80"] if mode == "influence" else []
    return run_child("synthetic.py", [mode, "--n-train", "10000", *extra])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layerwise", type=int, default=10_000)
    parser.add_argument("--n-vmap", type=int, default=1_000)
    parser.add_argument("--ratio", action="store_true", help="also influence / one epoch")
    parser.add_argument("--cnn", action="store_true", help="also the digits CNN")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fm = FunctionalModel(wide_mlp(HIDDEN_1M).eval(), ClassificationTask())
    data = stacked(max(args.n_layerwise, args.n_vmap))
    val_inverse = torch.randn(8, fm.n_params) * 1e-3
    evecs = torch.linalg.qr(torch.randn(fm.n_params, 16))[0].T.contiguous()
    inverse = LowRankInverse(evecs, torch.linspace(10.0, 1.0, 16), damping=1e-3)

    results: dict[str, Any] = {"n_params": fm.n_params, "n_val": 8, "batch_size": 64}
    rate, layerwise_scores = _timed_pass(fm, data, args.n_layerwise, val_inverse)
    results["layerwise_examples_per_s"] = rate
    rate, _ = _timed_pass(fm, data, args.n_layerwise, val_inverse, inverse=inverse)
    results["layerwise_self_influence_examples_per_s"] = rate
    rate, vmap_scores = _vmap_rate(fm, data, args.n_vmap, val_inverse)
    results["vmap_examples_per_s"] = rate
    assert layerwise_scores is not None and vmap_scores is not None
    both = layerwise_scores[: args.n_vmap]
    results["max_relative_difference"] = float(
        (both - vmap_scores).abs().max() / vmap_scores.abs().max()
    )
    results["speedup"] = results["layerwise_examples_per_s"] / results["vmap_examples_per_s"]

    print(f"{'route':<32} {'examples/s':>11}")
    print(f"{'vmap (per-sample gradients)':<32} {results['vmap_examples_per_s']:>11.0f}")
    print(f"{'layer-wise':<32} {results['layerwise_examples_per_s']:>11.0f}")
    print(
        f"{'layer-wise + self-influence':<32} "
        f"{results['layerwise_self_influence_examples_per_s']:>11.0f}"
    )
    print(
        f"speed-up {results['speedup']:.1f}x; scores differ by at most "
        f"{results['max_relative_difference']:.1e} of their largest"
    )
    if args.cnn:
        _cnn(results)
    if args.ratio:
        epoch, influence = _child("epoch"), _child("influence")
        results["epoch_s"] = epoch["wall_s"]
        results["influence_s"] = influence["wall_s"]
        results["influence_stages_s"] = {
            k: v for k, v in influence["diagnostics"].items() if k.startswith("time_")
        }
        results["influence_over_epoch"] = influence["wall_s"] / epoch["wall_s"]
        print(
            f"influence {influence['wall_s']:.1f} s / one epoch {epoch['wall_s']:.2f} s = "
            f"{results['influence_over_epoch']:.1f}x; stages {results['influence_stages_s']}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
