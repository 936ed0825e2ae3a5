"""One synthetic influence job in its own process: time, stage breakdown and peak memory.

The scaling and memory benchmarks call this script once per size (``common.run_child``) so that
each peak-RSS figure belongs to one run only. The training set is generated on the fly from each
index (a few hundred bytes per example are never held for the whole set), so the memory measured
is the engine's, not the data's.

Usage::

    python benchmarks/synthetic.py influence --n-train 10000 --n-val 8 --hidden 9000
    python benchmarks/synthetic.py influence --n-train 10000 --solver default   # LiSSA()
    python benchmarks/synthetic.py epoch --n-train 10000 --hidden 9000

The last line printed is a JSON object. ``cpu_s`` is the process's CPU time over the same
span as ``wall_s``: on a shared machine it drifts far less with the load than wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

IN_DIM = 100
CLASSES = 10


class SyntheticClassification(Dataset[tuple[Tensor, Tensor]]):
    """``n`` Gaussian inputs of dimension ``dim``, each drawn from a generator seeded by its
    index, labelled by a fixed random linear teacher: nothing is stored per example."""

    def __init__(self, n: int, dim: int = IN_DIM, seed: int = 0) -> None:
        self.n, self.dim, self.seed = n, dim, seed
        gen = torch.Generator().manual_seed(seed)
        self.teacher = torch.randn(dim, CLASSES, generator=gen)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        x = torch.randn(self.dim, generator=gen)
        return x, (x @ self.teacher).argmax()


HIDDEN_1M = 9000  # wide_mlp(HIDDEN_1M) has 999,010 parameters


def stacked(n: int, seed: int = 0) -> TensorDataset:
    """``SyntheticClassification(n, seed=seed)`` held as tensors (for in-process benchmarks)."""
    data = SyntheticClassification(n, seed=seed)
    xs, ys = zip(*(data[i] for i in range(n)), strict=True)
    return TensorDataset(torch.stack(xs), torch.stack(ys))


def wide_mlp(hidden: int, dim: int = IN_DIM) -> nn.Module:
    """``dim -> hidden -> 10`` with ReLU: about ``hidden * (dim + 11)`` parameters
    (``hidden=9000`` gives 1.0M; its forward costs about as much as its parameter count)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssTrace:
    """Samples this process's resident set size every ``period`` seconds in a thread, so that a
    peak can be placed in a stage of ``compute_influence`` (its ``time_*`` diagnostics give the
    stages' lengths, in order)."""

    def __init__(self, period: float = 0.02) -> None:
        self.period, self.samples = period, [(time.perf_counter(), _rss_mb())]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append((time.perf_counter(), _rss_mb()))

    def __enter__(self) -> RssTrace:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peaks(self, start: float, stages: list[tuple[str, float]]) -> dict[str, float]:
        """Largest sample in each stage, the stages laid end to end from ``start``."""
        out, t0 = {}, start
        for name, length in stages:
            inside = [rss for t, rss in self.samples if t0 <= t <= t0 + length]
            out[name] = max(inside, default=float("nan"))
            t0 += length
        return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_influence(args: argparse.Namespace) -> dict[str, Any]:
    from lightning_influence import LiSSA, compute_influence
    from lightning_influence.core.curvature import Curvature
    from lightning_influence.core.data import as_indexed
    from lightning_influence.core.model import FunctionalModel
    from lightning_influence.core.task import ClassificationTask

    model = wide_mlp(args.hidden).eval()
    train = SyntheticClassification(args.n_train, seed=0)
    val = SyntheticClassification(args.n_val, seed=1)
    scale = args.scale
    if args.solver == "default":  # the package's default solver, everything estimated inside
        solver = LiSSA()
    elif scale is None:  # estimated once, outside the timed call, on the first 1,000 examples
        fm = FunctionalModel(model, ClassificationTask())
        sub = as_indexed(train, torch.arange(min(1000, args.n_train)), args.batch_size)
        est = LiSSA(batch_size=args.lissa_batch)
        gen = torch.Generator().manual_seed(0)
        scale = float(est.estimate_scale(Curvature(fm, sub), args.damping, gen))
        del fm, sub
    if args.solver == "fixed":
        solver = LiSSA(depth=args.depth, batch_size=args.lissa_batch, scale=scale)
    elif args.solver == "plain":  # no preconditioner, no full-data passes: the scoring pass's own
        solver = LiSSA(
            preconditioner=None, depth=args.depth, batch_size=args.lissa_batch, scale=scale
        )
    baseline = peak_rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    with RssTrace() as trace:
        result = compute_influence(
            model,
            train,
            val,
            solver=solver,
            damping=args.damping,
            self_influence=args.self_influence,
            batch_size=args.batch_size,
            progress=False,
        )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    order = ["val_gradients", "solver", "self_influence_factorize", "scoring"]
    d = result.diagnostics
    stages = [(k, float(d[f"time_{k}"])) for k in order if f"time_{k}" in d]
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "mode": "influence",
        "n_train": args.n_train,
        "n_val": args.n_val,
        "n_params": n_params,
        "batch_size": args.batch_size,
        "solver": solver.settings(),
        "scale": result.diagnostics.get("solver_scale", scale),
        "damping": args.damping,
        "wall_s": wall,
        "cpu_s": cpu,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_by_stage_mb": trace.peaks(start, stages),
        "scores_shape": list(result.scores.shape),
        "scores_finite": bool(torch.isfinite(result.scores).all()),
        "self_influence": args.self_influence,
        "diagnostics": {
            k: float(v) for k, v in result.diagnostics.items() if isinstance(v, int | float)
        },
        "train_examples_per_s": args.n_train / result.diagnostics["time_scoring"],
    }


def sgd_epoch(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], opt: torch.optim.Optimizer
) -> tuple[float, float]:
    """One epoch of cross-entropy steps of ``opt`` over ``loader``: wall and CPU seconds."""
    start, cpu_start = time.perf_counter(), time.process_time()
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - start, time.process_time() - cpu_start


def run_epoch(args: argparse.Namespace) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    model = wide_mlp(args.hidden)
    loader = DataLoader(
        SyntheticClassification(args.n_train, seed=0), batch_size=args.batch_size, shuffle=True
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=args.damping)
    wall, cpu = sgd_epoch(model, loader, opt)
    return {
        "mode": "epoch",
        "n_train": args.n_train,
        "n_params": sum(p.numel() for p in model.parameters()),
        "batch_size": args.batch_size,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["influence", "epoch"])
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-val", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=HIDDEN_1M)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--solver",
        choices=["fixed", "default", "plain"],
        default="fixed",
        help="fixed: LiSSA(depth, lissa-batch, scale) as below; default: LiSSA() as shipped; "
        "plain: the fixed one without its preconditioner (the memory of the scoring pass alone)",
    )
    parser.add_argument("--depth", type=int, default=10, help="LiSSA steps")
    parser.add_argument("--lissa-batch", type=int, default=32)
    parser.add_argument("--scale", type=float, default=None)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--self-influence", action="store_true", help="also self-influence")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = run_influence(args) if args.mode == "influence" else run_epoch(args)
    out["threads"] = args.threads
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
