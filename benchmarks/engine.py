"""Engine benchmarks: vmap vs loop gradients, batched vs one-at-a-time LiSSA, default-settings
accuracy against the exact solver, and peak memory vs training-set size.

Usage::

    python benchmarks/engine.py            # all four parts, about 3-5 minutes on one thread
    python benchmarks/engine.py --only grads lissa
    python benchmarks/engine.py --reuse    # memory part: reuse child runs already measured

Prints markdown tables and ratios; writes ``benchmarks/results/engine.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from common import (
    MEMORY_ENV,
    RESULTS,
    WEIGHT_DECAY,
    agreement,
    fitted_digits,
    float32,
    run_child,
    setup,
    table,
    timed,
    write_json,
)
from torch import Tensor, nn

from lightning_influence import CG, Exact, LiSSA, compute_influence
from lightning_influence.core.curvature import Curvature
from lightning_influence.core.data import as_indexed
from lightning_influence.core.gradients import per_sample_gradients
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.task import ClassificationTask


def loop_gradients(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The baseline a user would write: one batch-size-1 backward pass per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def bench_grads(repeats: int) -> list[dict[str, Any]]:
    """(1) Per-sample gradients, batch 256: ``torch.func`` vmap vs a Python loop."""
    from digits import DigitsCNN, DigitsDataModule

    dm = DigitsDataModule(n_train=1200)
    images, labels = dm.train_dataset.tensors
    model_mlp, train, _ = fitted_digits("mlp")
    (mlp32, train32) = float32(model_mlp, train)
    cases = [
        ("MLP 64-32-10 tanh", mlp32, train32.tensors[0][:256], train32.tensors[1][:256]),
        ("DigitsCNN (conv-conv-linear)", DigitsCNN().eval(), images[:256], labels[:256]),
    ]
    rows = []
    for name, model, x, y in cases:
        fm = FunctionalModel(model, ClassificationTask())
        fast = timed(lambda fm=fm, x=x, y=y: per_sample_gradients(fm, x, y), repeats, warmup=1)
        slow = timed(lambda model=model, x=x, y=y: loop_gradients(model, x, y), repeats, warmup=1)
        diff = float((fast.value - slow.value).abs().max() / slow.value.abs().max())
        rows.append(
            {
                "model": name,
                "params": fm.n_params,
                "batch": len(x),
                "vmap_ms": 1e3 * fast.best,
                "loop_ms": 1e3 * slow.best,
                "speedup": slow.best / fast.best,
                "speedup_median": slow.median / fast.median,
                "max_rel_diff": diff,
            }
        )
    table(
        rows,
        [
            "model",
            "params",
            "batch",
            "vmap_ms",
            "loop_ms",
            "speedup",
            "speedup_median",
            "max_rel_diff",
        ],
        f"Per-sample gradients: vmap vs loop (best of {repeats})",
    )
    return rows


def bench_lissa(n_val: int, depth: int, repeats: int) -> dict[str, Any]:
    """(2) LiSSA on ``n_val`` validation vectors: one batched run vs one run per vector."""
    model, train, val = fitted_digits("mlp")
    model32, train32, val32 = float32(model, train, val)
    fm = FunctionalModel(model32, ClassificationTask())
    curv = Curvature(fm, as_indexed(train32, batch_size=256))
    x, y = val32.tensors
    vectors = per_sample_gradients(fm, x[:n_val], y[:n_val]).detach()
    gen = torch.Generator().manual_seed(0)
    scale = float(LiSSA().estimate_scale(curv, WEIGHT_DECAY, gen))
    solver = LiSSA(depth=depth, scale=scale, tol=1e-12, seed=0)

    def batched() -> Tensor:
        return solver.solve(curv, vectors, WEIGHT_DECAY)[0]

    def one_at_a_time() -> Tensor:
        return torch.cat(
            [solver.solve(curv, vectors[i : i + 1], WEIGHT_DECAY)[0] for i in range(n_val)]
        )

    fast = timed(batched, repeats)
    slow = timed(one_at_a_time, 1)
    diff = float((fast.value - slow.value).norm() / slow.value.norm())
    row = {
        "n_val": n_val,
        "depth": depth,
        "lissa_batch": solver.batch_size,
        "scale": scale,
        "batched_s": fast.best,
        "one_at_a_time_s": slow.best,
        "speedup": slow.best / fast.best,
        "per_step_ms_batched": 1e3 * fast.best / depth,
        "per_step_ms_single": 1e3 * slow.best / depth / n_val,
        "rel_diff": diff,
    }
    table(
        [row],
        list(row),
        f"LiSSA, {n_val} validation points: batched vs one at a time (same settings)",
    )
    return row


def bench_accuracy(n_val: int) -> list[dict[str, Any]]:
    """(3) Default-settings ``LiSSA()`` (and ``CG()``) vs ``Exact()`` on the digits references."""
    rows = []
    for kind, label in [("logreg", "logistic regression"), ("mlp", "MLP 64-32-10 tanh")]:
        model, train, val = fitted_digits(kind)
        idx = torch.arange(n_val)
        t0 = time.perf_counter()
        ref = compute_influence(
            model, train, val, solver=Exact(), damping=WEIGHT_DECAY, val_indices=idx,
            self_influence=False, progress=False,
        )  # fmt: skip
        t_ref64 = time.perf_counter() - t0
        model32, train32, val32 = float32(model, train, val)
        for solver in (Exact(), LiSSA(), CG()):
            t0 = time.perf_counter()
            res = compute_influence(
                model32, train32, val32, solver=solver, damping=WEIGHT_DECAY, val_indices=idx,
                self_influence=False, progress=False,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            d = res.diagnostics
            rows.append(
                {
                    "model": label,
                    "solver": f"{solver.name} (defaults)",
                    "n_val": n_val,
                    **agreement(ref.scores, res.scores),
                    "wall_s": wall,
                    "solver_s": d.get("time_solver"),
                    "scale": d.get("solver_scale"),
                    "steps": d.get("solver_steps"),
                    "momentum": d.get("solver_momentum"),
                    "rel_change": d.get(
                        "solver_relative_change", d.get("solver_relative_residual")
                    ),
                    "exact_f64_s": t_ref64,
                    "settings": res.settings.get("solver"),
                }
            )
    table(
        rows,
        ["model", "solver", "n_val", "pearson", "spearman", "top10", "wall_s", "solver_s", "scale",
         "steps", "momentum", "rel_change"],
        f"Default settings vs Exact (float64 reference), damping = L2 = {WEIGHT_DECAY}, float32",
    )  # fmt: skip
    return rows


def bench_memory(reuse: bool) -> dict[str, Any]:
    """(4) Peak RSS of one child process per training-set size, p about 1M, 8 validation points."""
    runs = {}
    for n in (10_000, 100_000):
        args = [
            "influence",
            "--n-train",
            str(n),
            "--n-val",
            "8",
            "--hidden",
            "9000",
            "--scale",
            "80",
        ]
        runs[n] = run_child("synthetic.py", args, MEMORY_ENV, reuse=reuse)
    small, large = runs[10_000], runs[100_000]
    row = {
        "params": small["n_params"],
        "rss_10k_mb": small["peak_rss_mb"],
        "rss_100k_mb": large["peak_rss_mb"],
        "ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
        "above_baseline_10k_mb": small["peak_rss_mb"] - small["baseline_rss_mb"],
        "above_baseline_100k_mb": large["peak_rss_mb"] - large["baseline_rss_mb"],
        "wall_10k_s": small["wall_s"],
        "wall_100k_s": large["wall_s"],
    }
    row["ratio_above_baseline"] = row["above_baseline_100k_mb"] / row["above_baseline_10k_mb"]
    table([row], list(row), "Peak memory while scoring 10k vs 100k synthetic points (p about 1M)")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description="Engine benchmarks")
    parts = ["grads", "lissa", "accuracy", "memory"]
    parser.add_argument("--only", nargs="+", choices=parts, default=parts)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reuse", action="store_true", help="reuse cached child runs (memory)")
    args = parser.parse_args()
    setup(threads=1)
    out: dict[str, Any] = {}
    if "grads" in args.only:
        out["grads"] = bench_grads(args.repeats)
    if "lissa" in args.only:
        out["lissa_batched"] = bench_lissa(n_val=64, depth=50, repeats=3)
    if "accuracy" in args.only:
        out["accuracy"] = bench_accuracy(n_val=50)
    if "memory" in args.only:
        out["memory"] = bench_memory(args.reuse)
    print("\nRatios:")
    for row in out.get("grads", []):
        print(
            f"  per-sample gradients, {row['model']}: vmap {row['speedup']:.1f}x faster than loop"
        )
    if "lissa_batched" in out:
        print(f"  LiSSA 64 val points: batched {out['lissa_batched']['speedup']:.1f}x faster")
    if "memory" in out:
        print(f"  peak RSS 100k / 10k: {out['memory']['ratio']:.3f}")
    write_json("engine", {**_previous(), **out})


def _previous() -> dict[str, Any]:
    """Parts of an earlier ``engine.json`` (so that ``--only`` runs add to it)."""
    path = RESULTS / "engine.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    data.pop("machine", None)
    return data


if __name__ == "__main__":
    main()
