"""GPU benchmark: scaling, memory, overhead vs an epoch and throughput with a ResNet-style model.

Sized to finish in under 5 minutes on one H200: synthetic 3x32x32 images held on the GPU, a
ResNet-style CNN (four residual stages, BatchNorm in evaluation mode, about 1.2M parameters),
``LiSSA(depth=20, batch_size=256)`` with a fixed scale, no self-influence. Prints the same tables
as the CPU scaling benchmark plus throughput (training examples scored per second) and peak GPU
memory (``torch.cuda.max_memory_allocated``, reset before each run); writes
``benchmarks/results/gpu.json``.

Usage::

    python benchmarks/gpu.py                    # on a machine with a CUDA GPU
    python benchmarks/gpu.py --device cpu --n-train 2000   # CPU: one epoch vs one run, by stage
    python benchmarks/gpu.py --device cpu --tiny   # a smoke test of the script itself

With ``--n-train`` it times one SGD epoch (batch 64) and one ``compute_influence`` call with the
package's default solver, ``LiSSA()`` (``--solver fixed``: the sweep's; ``--solver short``: ten
plain steps, so that a CPU run ends), on that many images and ``--n-val`` validation images, and
prints their ratio with the stage breakdown (``--probe``: one curvature product timed first,
against a forward and backward pass on the same examples; ``--probe-only``: nothing else;
``--self-influence``: also self-influence); it writes
``benchmarks/results/gpu_<device>_<n>_<solver>.json`` (``--tiny``: ``gpu_smoke.json``).

A ``--budget-s`` guard (default 270 s) skips the remaining runs once it is spent, so the script
always ends with its tables.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from common import Clock, setup, table, write_json
from synthetic import peak_rss_mb
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_influence import LiSSA, Solver, compute_influence


class Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


def resnet(width: int = 32, classes: int = 10) -> nn.Module:
    """Stem, four residual stages (``width`` to ``8 * width`` channels), pooling, linear head."""
    torch.manual_seed(0)
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, 1, 1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        Block(w, w, 1),
        Block(w, 2 * w, 2),
        Block(2 * w, 4 * w, 2),
        Block(4 * w, 8 * w, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * w, classes),
    )


def synthetic(n: int, device: torch.device, seed: int) -> TensorDataset:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen, device=device)
    y = torch.randint(0, 10, (n,), generator=gen, device=device)
    return TensorDataset(x, y)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_run(
    model: nn.Module,
    train: TensorDataset,
    n_val: int,
    device: torch.device,
    batch_size: int,
    solver: Solver,
    scoring_dtype: str | None,
    self_influence: bool = False,
) -> dict[str, Any]:
    """One ``compute_influence`` call: wall time, its stages (``time_*``), throughput, memory.
    ``scoring_dtype`` (``"bfloat16"``) lowers the scoring pass only, accumulating in float32."""
    val = synthetic(n_val, device, seed=1)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    result = compute_influence(
        model, train, val, solver=solver, damping=1e-3, self_influence=self_influence,
        batch_size=batch_size, scoring_dtype=scoring_dtype, progress=False,
    )  # fmt: skip
    sync(device)
    wall = time.perf_counter() - start
    d = result.diagnostics
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "n_train": len(train),
        "n_val": n_val,
        "dtype": scoring_dtype or "float32",
        "total_s": wall,
        "val_grads_s": d.get("time_val_gradients"),
        "solver_s": d.get("time_solver"),
        "self_influence_s": d.get("time_self_influence_factorize"),
        "scoring_s": d.get("time_scoring"),
        "train_ex_per_s": len(train) / d["time_scoring"],
        "solver_steps": d.get("solver_steps"),
        "gpu_peak_mb": mem,
        "peak_rss_mb": peak_rss_mb(),
        "finite": bool(torch.isfinite(result.scores).all()),
    }


def epoch_time(model: nn.Module, train: TensorDataset, device: torch.device, batch: int) -> float:
    import copy

    net = copy.deepcopy(model).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    x, y = train.tensors
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[i : i + batch]), y[i : i + batch]).backward()
        opt.step()
    sync(device)
    return time.perf_counter() - start


def exponent(xs: list[float], ys: list[float]) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


# --solver: "default" as shipped; "fixed" as in the GPU sweep (preconditioned, 20 steps);
# "short": plain recursion, 10 steps of 32 examples at a fixed scale, so that a CPU run ends
# (a timing figure for the other stages, not converged scores).
SOLVERS: dict[str, Solver] = {
    "default": LiSSA(),
    "fixed": LiSSA(depth=20, batch_size=256, scale=100.0),
    "short": LiSSA(preconditioner=None, depth=10, batch_size=32, scale=100.0),
}


def product_time(
    model: nn.Module, train: TensorDataset, n_val: int, device: torch.device, batch: int = 256
) -> None:
    """Time one Gauss-Newton product of ``n_val`` vectors on a minibatch of ``batch`` (256: a step
    of ``LiSSA()``) and of 1 vector on 1,024 examples (a Nystrom product of its preconditioner),
    each twice (the first call also measures the model's passes), against one forward and
    backward pass on the same examples (summed cross-entropy, plain autograd; at once and in
    batches of 64) in the same run;
    prints seconds and the ratio per vector, in CPU time on a CPU (wall time on a GPU)."""
    from lightning_influence import ClassificationTask, FunctionalModel, as_indexed
    from lightning_influence.core.curvature import Curvature

    def clock() -> float:
        sync(device)
        return time.process_time() if device.type == "cpu" else time.perf_counter()

    fm = FunctionalModel(model, ClassificationTask())
    x, y = train.tensors
    for n, k in ((min(batch, len(train)), n_val), (min(1024, len(train)), 1)):
        step, step_64 = (_training_pass(model, x[:n], y[:n], b, clock) for b in (n, 64))
        curv = Curvature(fm, as_indexed(train, torch.arange(n), n), "gauss_newton")
        vectors = torch.randn(k, fm.n_params, device=device)
        for call in ("first", "second"):
            start = clock()
            curv.matvec(vectors)
            took = clock() - start
            print(f"one Gauss-Newton product, {k} vector(s), {n} examples ({call} call): "
                  f"{took:.1f} s; forward + backward {step:.2f} s ({step_64:.2f} s in batches "
                  f"of 64); {took / k / step:.2f}x per vector ({took / k / step_64:.2f}x)",
                  flush=True)  # fmt: skip


def _training_pass(model: nn.Module, x: Tensor, y: Tensor, batch: int, clock: Any) -> float:
    """Seconds of one forward and backward pass over ``x`` in batches of ``batch``."""
    start = clock()
    for i in range(0, len(x), batch):
        model.zero_grad()
        part = slice(i, i + batch)
        nn.functional.cross_entropy(model(x[part]), y[part], reduction="sum").backward()
    took = clock() - start
    model.zero_grad()
    return float(took)


STAGES = ["total_s", "val_grads_s", "solver_s", "self_influence_s", "scoring_s"]


def cpu_run(args: argparse.Namespace) -> None:
    """``--n-train N``: one epoch and one influence run at the package's defaults, their ratio
    and the stage breakdown (sized for a CPU: scoring and training batches of 64)."""
    device = torch.device(args.device)
    model = resnet(args.width).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device {device}, model {n_params:,} parameters, {args.n_train:,} training images")
    train = synthetic(args.n_train, device, 0)
    solver = SOLVERS[args.solver]
    if args.probe:
        product_time(model, train, args.n_val, device, args.probe_batch)
        if args.probe_only:
            return
    clock = Clock()
    ep = epoch_time(model, train, device, 64)
    ep_cpu = clock.read()[1]
    clock = Clock()
    row = one_run(model, train, args.n_val, device, 64, solver, None, args.self_influence)
    inf_cpu = clock.read()[1]
    over = {"epoch_s": ep, "influence_s": row["total_s"], "ratio": row["total_s"] / ep}
    # CPU time drifts far less than wall time with the load of a shared machine
    over.update({"epoch_cpu_s": ep_cpu, "influence_cpu_s": inf_cpu, "cpu_ratio": inf_cpu / ep_cpu})
    over.update({k: row[k] for k in [*STAGES[1:], "train_ex_per_s", "solver_steps"]})
    title = (
        f"Influence vs one epoch ({n_params:,} params, {args.n_train:,} train, "
        f"{args.n_val} val, solver {args.solver}, self-influence {args.self_influence})"
    )
    table([over], list(over), title)
    table([row], [c for c in row if c not in ("gpu_peak_mb",)], "The influence run")
    name = f"gpu_{device.type}_{args.n_train}_{args.solver}"
    write_json(name, {"n_params": n_params, "run": row, "overhead": over, "args": vars(args)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--budget-s", type=float, default=270.0)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument(
        "--n-train", type=int, default=None, help="one run at this size vs one epoch (CPU mode)"
    )
    parser.add_argument("--n-val", type=int, default=8, help="validation points (with --n-train)")
    parser.add_argument(
        "--solver",
        choices=sorted(SOLVERS),
        default="default",
        help="with --n-train: LiSSA() as shipped, the sweep's LiSSA(depth=20, scale=100), or a "
        "short plain recursion (see SOLVERS)",
    )
    parser.add_argument(
        "--probe", action="store_true", help="with --n-train: first time one curvature product"
    )
    parser.add_argument("--probe-only", action="store_true", help="with --probe: stop after it")
    parser.add_argument("--probe-batch", type=int, default=256, help="with --probe: its minibatch")
    parser.add_argument("--self-influence", action="store_true", help="with --n-train")
    args = parser.parse_args()
    setup(threads=1 if args.device == "cpu" else 4)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "No CUDA device: run on a GPU machine, or pass `--device cpu --n-train 2000` "
            "(or `--device cpu --tiny`)."
        )
    if args.n_train is not None:
        cpu_run(args)
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # plain fp32 unless bf16 is asked for
    started = time.perf_counter()
    width = 4 if args.tiny else args.width
    train_sizes = [64, 128, 256] if args.tiny else [10_000, 30_000, 100_000]
    val_sizes = [2, 4, 8] if args.tiny else [8, 64, 512]
    batch = 32 if args.tiny else 512
    depth = 2 if args.tiny else 20
    lissa_batch = 16 if args.tiny else 256
    model = resnet(width).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), model {n_params:,} parameters")
    # fixed scale (no power iteration inside the timed calls); finite scores are checked
    solver = LiSSA(depth=depth, batch_size=lissa_batch, scale=100.0)

    def within_budget() -> bool:
        return time.perf_counter() - started < args.budget_s

    # warm-up (CUDA context, kernels)
    warm = LiSSA(depth=1, batch_size=lissa_batch, scale=100.0)
    one_run(model, synthetic(train_sizes[0] // 4, device, 0), 2, device, batch, warm, None)
    train_rows = []
    for n in train_sizes:
        if not within_budget():
            print(f"budget spent: n_train={n} skipped")
            break
        train_rows.append(one_run(model, synthetic(n, device, 0), 8, device, batch, solver, None))
    val_rows = []
    mid = synthetic(train_sizes[1], device, 0)
    for m in val_sizes:
        if not within_budget():
            print(f"budget spent: n_val={m} skipped")
            break
        val_rows.append(one_run(model, mid, m, device, batch, solver, None))
    bf16_rows = []
    if within_budget():
        try:
            bf16_rows.append(one_run(model, mid, val_sizes[1], device, batch, solver, "bfloat16"))
        except Exception as exc:  # report, do not stop
            bf16_rows.append({"dtype": "bfloat16", "error": f"{type(exc).__name__}: {exc}"[:200]})
    overhead = {}
    if within_budget():
        ep = epoch_time(model, mid, device, 256)
        inf = next((r for r in train_rows if r["n_train"] == len(mid)), None)
        if inf:
            overhead = {"n_train": len(mid), "epoch_s": ep, "influence_s": inf["total_s"],
                        "ratio": inf["total_s"] / ep,
                        **{k: inf[k] for k in [*STAGES[1:], "train_ex_per_s"]}}  # fmt: skip
    cols = ["n_train", "n_val", "dtype", *STAGES, "train_ex_per_s", "gpu_peak_mb", "finite"]
    table(train_rows, cols, f"GPU: time vs training points ({n_params:,} params)")
    table(val_rows + bf16_rows, [*cols, "error"], "GPU: time vs validation points; bf16")
    fits = {}
    if len(train_rows) >= 2:
        fits["n_train_total"] = exponent(
            [r["n_train"] for r in train_rows], [r["total_s"] for r in train_rows]
        )
        if train_rows[0]["gpu_peak_mb"]:
            fits["gpu_mem_ratio_last_first"] = (
                train_rows[-1]["gpu_peak_mb"] / train_rows[0]["gpu_peak_mb"]
            )
    if len(val_rows) >= 2:
        fits["n_val_total"] = exponent(
            [r["n_val"] for r in val_rows], [r["total_s"] for r in val_rows]
        )
    if overhead:
        table([overhead], list(overhead), "GPU: influence time vs one training epoch, by stage")
    print(f"exponents and ratios: {fits}")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    write_json(
        "gpu" if not args.tiny else "gpu_smoke",
        {"n_params": n_params, "train_sweep": train_rows, "val_sweep": val_rows,
         "bf16": bf16_rows, "overhead": overhead, "fits": fits},
    )  # fmt: skip


if __name__ == "__main__":
    main()
