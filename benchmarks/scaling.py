"""Scaling: time vs training-set size and vs validation points, overhead vs a training epoch,
peak memory vs training-set size, and the scaling plot for the docs.

Every influence run is its own child process (``synthetic.py``), so each peak-RSS figure is its
own. Sizes, sized for a shared 2-core CPU at one thread:

- training-set sweep: 1k / 10k / 100k synthetic points, a ``100 -> 9000 -> 10`` ReLU MLP
  (999,010 parameters), 8 validation points, ``LiSSA(depth=10, batch_size=32, scale=80)``, no
  self-influence (no exact inverse exists at this size), scoring batches of 64;
- validation sweep: 8 / 64 / 512 points, 1k training points, the same MLP 4x narrower
  (``hidden=2250``, 249,760 parameters: 512 validation vectors of 1M parameters need ~2 GB per
  copy and LiSSA keeps several copies, more than this shared machine has to spare);
- overhead: one SGD epoch vs one influence run, for the digits CNN (Exact self-influence) and
  the 1M-parameter model (10k points).

Usage::

    python benchmarks/scaling.py           # ~30 min on one thread, most of it the 100k run
    python benchmarks/scaling.py --reuse   # reuse child runs already measured (cache)
    python benchmarks/scaling.py --quick   # 1k / 5k / 10k and 8 / 32 / 128, a few minutes
    python benchmarks/scaling.py --memory  # peak RSS at 10k vs 100k, default allocator
    python benchmarks/scaling.py --ratio   # influence / one epoch at 10k: LiSSA(), LiSSA(depth=10)

Prints tables and fitted exponents; writes ``benchmarks/results/scaling.json`` and
``docs/img/scaling.png``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import MALLOC_ENV, ROOT, digits_cnn_epoch, run_child, setup, table, write_json
from synthetic import HIDDEN_1M

HIDDEN_250K = 2250
SCALE = "80"  # LiSSA scale, from one power-iteration estimate (82.7 incl. margin) on 1k points


def exponent(xs: list[float], ys: list[float]) -> float:
    """Slope of ``log y`` against ``log x`` (least squares): 1 means linear growth."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def influence_args(n_train: int, n_val: int, hidden: int, scale: str | None = SCALE) -> list[str]:
    """``synthetic.py influence`` arguments; ``scale=None`` lets the solver estimate its own."""
    args = ["influence", "--n-train", str(n_train), "--n-val", str(n_val), "--hidden", str(hidden)]
    return [*args, "--scale", scale] if scale else args


def sweep_train(sizes: list[int], reuse: bool) -> dict[str, Any]:
    rows = []
    for n in sizes:
        r = run_child("synthetic.py", influence_args(n, 8, HIDDEN_1M), MALLOC_ENV, reuse=reuse)
        d = r["diagnostics"]
        rows.append(
            {
                "n_train": n,
                "params": r["n_params"],
                "total_s": d["time_total"],
                "val_grads_s": d["time_val_gradients"],
                "solver_s": d["time_solver"],
                "scoring_s": d["time_scoring"],
                "train_ex_per_s": n / d["time_scoring"],
                "peak_rss_mb": r["peak_rss_mb"],
                "baseline_rss_mb": r["baseline_rss_mb"],
                "measured": r.get("measured"),
            }
        )
    n = [r["n_train"] for r in rows]
    fit = {
        "total": exponent(n, [r["total_s"] for r in rows]),
        "scoring": exponent(n, [r["scoring_s"] for r in rows]),
        "peak_rss": exponent(n, [r["peak_rss_mb"] for r in rows]),
        "rss_ratio_last_over_middle": rows[-1]["peak_rss_mb"] / rows[-2]["peak_rss_mb"],
    }
    table(
        rows, [c for c in rows[0] if c != "measured"], "Time and peak memory vs training-set size"
    )
    print(f"exponents vs n_train: {fit}")
    return {"rows": rows, "exponents": fit}


def sweep_val(sizes: list[int], n_train: int, reuse: bool) -> dict[str, Any]:
    rows = []
    for m in sizes:
        args = influence_args(n_train, m, HIDDEN_250K)
        r = run_child("synthetic.py", args, MALLOC_ENV, reuse=reuse)
        d = r["diagnostics"]
        rows.append(
            {
                "n_val": m,
                "n_train": n_train,
                "params": r["n_params"],
                "total_s": d["time_total"],
                "val_grads_s": d["time_val_gradients"],
                "solver_s": d["time_solver"],
                "scoring_s": d["time_scoring"],
                "peak_rss_mb": r["peak_rss_mb"],
            }
        )
    m = [r["n_val"] for r in rows]
    fit = {
        "total": exponent(m, [r["total_s"] for r in rows]),
        "solver": exponent(m, [r["solver_s"] for r in rows]),
        "scoring": exponent(m, [r["scoring_s"] for r in rows]),
    }
    table(rows, list(rows[0]), "Time vs number of validation points")
    print(f"exponents vs n_val: {fit}")
    return {"rows": rows, "exponents": fit}


def overhead_digits_cnn() -> dict[str, Any]:
    """One Adam epoch of the digits CNN (batch 64) vs ``compute_influence`` with ``Exact()``
    (1,898 parameters) for the 64 validation points and the self-influence.

    ``LiSSA()`` at its defaults is not used here: with damping 1e-3 its automatic depth on this
    model ran for more than 17 minutes on this machine without finishing (see the docs).
    """
    setup(threads=1)
    from digits import DigitsCNN, DigitsDataModule

    from lightning_influence import Exact, compute_influence

    dm = DigitsDataModule(n_train=1200)
    model = DigitsCNN()
    opt = model.configure_optimizers()
    loader = dm.train_dataloader()
    for _ in range(3):  # a model that has seen the data, as after fit
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    epochs = [digits_cnn_epoch(model, loader, opt) for _ in range(3)]
    model.eval()
    val = torch.utils.data.TensorDataset(*[t[:64] for t in dm.val_dataset.tensors])
    result = compute_influence(
        model,
        dm.train_dataset,
        val,
        solver=Exact(),
        damping=model.hparams.weight_decay,
        progress=False,
    )
    d = result.diagnostics
    logging_s = _time_logging(result, dm.train_dataset, val)
    row = {
        "model": f"DigitsCNN ({result.settings['n_params']} params), 1,200 train, 64 val",
        "epoch_s": min(epochs),
        "influence_s": d["time_total"],
        "ratio": d["time_total"] / min(epochs),
        "val_grads_s": d.get("time_val_gradients"),
        "solver_s": d.get("time_solver"),
        "self_influence_s": d.get("time_self_influence_factorize"),
        "scoring_s": d.get("time_scoring"),
        "logging_s": logging_s,
    }
    return row


def _time_logging(result: Any, train: Any, val: Any) -> float | None:
    """Time of the plain-file output of ``log_influence`` (no logger), if it is implemented."""
    try:
        from lightning_influence.core.task import ClassificationTask
        from lightning_influence.report import log_influence

        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            log_influence(result, [], train, val, ClassificationTask(), Path(tmp), None)
            return time.perf_counter() - start
    except Exception as exc:  # the logging stage may not exist yet
        print(f"logging stage not timed: {type(exc).__name__}: {exc}")
        return None


def overhead_1m(n_train: int, reuse: bool) -> dict[str, Any]:
    epoch = run_child(
        "synthetic.py",
        ["epoch", "--n-train", str(n_train), "--hidden", str(HIDDEN_1M)],
        MALLOC_ENV,
        reuse=reuse,
    )
    inf = run_child("synthetic.py", influence_args(n_train, 8, HIDDEN_1M), MALLOC_ENV, reuse=True)
    d = inf["diagnostics"]
    return {
        "model": f"MLP ({inf['n_params']:,} params), {n_train:,} train, 8 val",
        "epoch_s": epoch["wall_s"],
        "influence_s": d["time_total"],
        "ratio": d["time_total"] / epoch["wall_s"],
        "val_grads_s": d.get("time_val_gradients"),
        "solver_s": d.get("time_solver"),
        "self_influence_s": None,
        "scoring_s": d.get("time_scoring"),
        "logging_s": None,
    }


def memory_flat(sizes: list[int], solvers: list[str], reuse: bool) -> dict[str, Any]:
    """Peak RSS of the 1M-parameter MLP at each training-set size, each in its own process, with
    glibc's default allocator settings (no ``MALLOC_*`` variables), and the peak within each
    stage. ``solvers``: ``"plain"`` (LiSSA without its preconditioner, 10 steps: the scoring
    pass's memory alone) and ``"fixed"`` (the sweep's ``LiSSA(depth=10, batch_size=32,
    scale=80)``, preconditioned as shipped). The largest size's peak over the smallest's is the
    figure to keep below 1.2.
    """
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if env:
        raise SystemExit(f"--memory measures glibc's defaults: unset {sorted(env)} first.")
    rows, ratios = [], {}
    for solver in solvers:
        for n in sizes:
            args = [*influence_args(n, 8, HIDDEN_1M), "--solver", solver]
            r = run_child("synthetic.py", args, None, reuse=reuse)
            d, stages = r["diagnostics"], r.get("peak_rss_by_stage_mb", {})
            rows.append(
                {
                    "solver": solver,
                    "n_train": n,
                    "peak_rss_mb": r["peak_rss_mb"],
                    "baseline_rss_mb": r["baseline_rss_mb"],
                    **{f"peak_in_{k}_mb": v for k, v in stages.items()},
                    "total_s": d["time_total"],
                    "solver_s": d["time_solver"],
                    "scoring_s": d["time_scoring"],
                }
            )
        mine = [row for row in rows if row["solver"] == solver]
        ratios[solver] = mine[-1]["peak_rss_mb"] / mine[0]["peak_rss_mb"]
        scoring = [row.get("peak_in_scoring_mb") for row in mine]
        if all(scoring):
            ratios[f"{solver}_scoring_stage"] = scoring[-1] / scoring[0]
    table(rows, list(rows[0]), "Peak RSS vs training-set size, default allocator")
    print(f"peak RSS {sizes[-1]:,} / {sizes[0]:,}: {ratios} (target < 1.2)")
    return {"rows": rows, "ratios": ratios}


def ratio_1m(n_train: int, cap_s: float) -> dict[str, Any]:
    """Influence / one SGD epoch for the 1M-parameter MLP, 8 validation points, each run its own
    process: an epoch, the sweep's short ``LiSSA(depth=10)``, ``LiSSA()`` as shipped (given up
    after ``cap_s``), and an epoch again; ratios against the mean of the two epochs (the load
    of a shared machine drifts during a run), in wall time and in CPU time."""
    epoch_args = ["epoch", "--n-train", str(n_train), "--hidden", str(HIDDEN_1M)]
    first_run = run_child("synthetic.py", epoch_args)
    runs: dict[str, dict[str, Any] | None] = {}
    default_args = [*influence_args(n_train, 8, HIDDEN_1M, scale=None), "--solver", "default"]
    for name, args in (
        ("LiSSA(depth=10)", influence_args(n_train, 8, HIDDEN_1M)),
        ("LiSSA()", default_args),
    ):
        try:
            runs[name] = run_child("synthetic.py", args, timeout=cap_s)
        except subprocess.TimeoutExpired:
            print(f"{name}: not finished after {cap_s:.0f} s", flush=True)
            runs[name] = None
    last_run = run_child("synthetic.py", epoch_args)
    epoch = (first_run["wall_s"] + last_run["wall_s"]) / 2
    epoch_cpu = (first_run["cpu_s"] + last_run["cpu_s"]) / 2
    rows = []
    for name, r in runs.items():
        d = r["diagnostics"] if r else {}
        total = d.get("time_total", cap_s)
        rows.append(
            {
                "solver": name if r else f"{name} (stopped at the cap)",
                "epoch_s": epoch,
                "influence_s": total,
                "ratio": total / epoch if r else None,
                "epoch_cpu_s": epoch_cpu,
                "influence_cpu_s": r["cpu_s"] if r else None,
                "cpu_ratio": r["cpu_s"] / epoch_cpu if r else None,
                "val_grads_s": d.get("time_val_gradients"),
                "solver_s": d.get("time_solver"),
                "solver_steps": d.get("solver_steps"),
                "scoring_s": d.get("time_scoring"),
                "train_ex_per_s": n_train / d["time_scoring"] if r else None,
                "peak_rss_mb": r["peak_rss_mb"] if r else None,
            }
        )
    table(
        rows,
        list(rows[0]),
        f"Influence / one epoch, MLP (999,010 params), {n_train:,} train, 8 val",
    )
    print(
        f"epochs: {first_run['wall_s']:.2f} s before, {last_run['wall_s']:.2f} s after (CPU time "
        f"{first_run['cpu_s']:.2f} s, {last_run['cpu_s']:.2f} s)",
        flush=True,
    )
    return {"rows": rows, "epochs": [first_run, last_run]}


def plot(train: dict[str, Any], val: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    rows = train["rows"]
    n = np.array([r["n_train"] for r in rows], dtype=float)
    ax = axes[0]
    for key, label in [("total_s", "total"), ("scoring_s", "scoring"), ("solver_s", "solver")]:
        ax.loglog(n, [r[key] for r in rows], "o-", label=label)
    ax.loglog(n, rows[0]["scoring_s"] * n / n[0], "k:", label="linear")
    ax.set(xlabel="training points", ylabel="seconds", title=f"p = {rows[0]['params']:,}, 8 val "
           f"(exponent {train['exponents']['total']:.2f})")  # fmt: skip
    ax.legend(fontsize=8)
    vrows = val["rows"]
    m = np.array([r["n_val"] for r in vrows], dtype=float)
    ax = axes[1]
    for key, label in [("total_s", "total"), ("scoring_s", "scoring"), ("solver_s", "solver")]:
        ax.loglog(m, [r[key] for r in vrows], "o-", label=label)
    ax.loglog(m, vrows[-1]["total_s"] * m / m[-1], "k:", label="linear")
    ax.set(xlabel="validation points", ylabel="seconds", title=f"p = {vrows[0]['params']:,}, "
           f"{vrows[0]['n_train']:,} train (exponent {val['exponents']['total']:.2f})")  # fmt: skip
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.semilogx(n, [r["peak_rss_mb"] for r in rows], "o-", label="peak RSS")
    ax.semilogx(n, [r["baseline_rss_mb"] for r in rows], "s--", label="before the call")
    ax.set_ylim(0, max(r["peak_rss_mb"] for r in rows) * 1.3)
    ax.set(xlabel="training points", ylabel="MiB", title="peak memory vs training points")
    ax.legend(fontsize=8)
    fig.suptitle("lightning-influence on CPU, one thread (" + time.strftime("%Y-%m-%d") + ")")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Scaling, overhead and memory benchmarks")
    parser.add_argument("--reuse", action="store_true", help="reuse cached child runs")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    parser.add_argument("--no-overhead", action="store_true", help="skip the epoch comparison")
    parser.add_argument(
        "--ratio",
        action="store_true",
        help="only influence / one epoch at 10k points: LiSSA() and LiSSA(depth=10)",
    )
    parser.add_argument(
        "--memory-solvers", nargs="+", default=["plain", "fixed"], choices=["plain", "fixed"]
    )
    parser.add_argument("--cap-s", type=float, default=900.0, help="with --ratio: LiSSA() limit")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="only peak RSS at 10k and 100k points, default allocator",
    )
    parser.add_argument("--plot", default=str(ROOT / "docs" / "img" / "scaling.png"))
    args = parser.parse_args()
    setup(threads=1)
    if args.ratio:
        write_json("ratio_1m", ratio_1m(10_000, args.cap_s))
        return
    if args.memory:
        write_json("memory_flat", memory_flat([10_000, 100_000], args.memory_solvers, args.reuse))
        return
    train_sizes = [1000, 5000, 10_000] if args.quick else [1000, 10_000, 100_000]
    val_sizes = [8, 32, 128] if args.quick else [8, 64, 512]
    train = sweep_train(train_sizes, args.reuse)
    val = sweep_val(val_sizes, 1000, args.reuse)
    plot(train, val, Path(args.plot))
    over: list[dict[str, Any]] = []
    if not args.no_overhead:
        over = [overhead_1m(10_000 if not args.quick else 5000, args.reuse), overhead_digits_cnn()]
        table(
            over,
            list(over[0]),
            "Influence time vs one training epoch (ratio = influence / epoch), stage breakdown",
        )
    write_json(
        "scaling",
        {"train_sweep": train, "val_sweep": val, "overhead": over, "quick": args.quick},
    )


if __name__ == "__main__":
    main()
