"""Preconditioned LiSSA at its defaults against ``Exact()`` and ``CG()`` on the same curvature.

Prints, per model and damping: Pearson / Spearman of the scores against ``Exact()``, wall time,
the ratio to ``Exact()``'s time measured in the same run, and LiSSA's steps, preconditioner rank
and preconditioned condition number (result diagnostics). One intra-op thread.

    python benchmarks/lissa.py            # the digits MLP at damping 1e-2, 1e-3, 1e-4 and with
                                          # the Hessian at its optimum
    python benchmarks/lissa.py --cnn      # also the digits CNN of the examples at damping 1e-3
    python benchmarks/lissa.py --large    # only the 1M-parameter MLP of scaling.py at damping
                                          # 1e-3 against an exact reference (see `large`)
    python benchmarks/lissa.py --stopping --n-train 2000 --n-val 8
                                          # the stopping rule and a budget (see `stopping`)
    python benchmarks/lissa.py --sketch-memory 1073741824
                                          # the preconditioner's memory (see `sketch_memory`)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from common import MALLOC_ENV, agreement, fitted_digits, float32, run_child, table

from lightning_influence import CG, Exact, LiSSA, Solver, compute_influence


def compare(
    model: Any,
    train: Any,
    val: Any,
    damping: float,
    n_val: int,
    solvers: list[Solver],
    curvature: str = "gauss_newton",
) -> None:
    """One line per solver: agreement with ``Exact()`` and time against ``Exact()``'s."""
    options = dict(damping=damping, val_indices=torch.arange(n_val), self_influence=False,
                   progress=False, curvature=curvature)  # fmt: skip
    t0 = time.perf_counter()
    ref = compute_influence(model, train, val, solver=Exact(), **options)
    exact_s = time.perf_counter() - t0
    print(f"  exact            {exact_s:7.2f} s")
    for solver in solvers:
        t0 = time.perf_counter()
        res = compute_influence(model, train, val, solver=solver, **options)
        wall = time.perf_counter() - t0
        a, d = agreement(ref.scores, res.scores), res.diagnostics
        extra = ""
        if "solver_preconditioner_rank" in d:
            extra = (f" rank {d['solver_preconditioner_rank']:.0f}, condition "
                     f"{d.get('solver_preconditioned_condition_number', float('nan')):.3g}, "
                     f"final minibatch {d['solver_final_batch_size']:.0f}, conjugate-gradient "
                     f"steps {d.get('solver_conjugate_gradient_steps', 0):.0f}")  # fmt: skip
        print(f"  {solver.name:6s} pearson {a['pearson']:.4f} spearman {a['spearman']:.4f} "
              f"{wall:7.2f} s = {wall / exact_s:.2f}x exact, steps {d.get('solver_steps', 0):.0f}"
              f"{extra}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cnn", action="store_true", help="also the digits CNN at damping 1e-3")
    parser.add_argument("--large", action="store_true", help="only the 1M-parameter MLP")
    parser.add_argument("--n-train", type=int, default=500, help="--large: training points")
    parser.add_argument("--n-val", type=int, default=8, help="--large: validation points")
    parser.add_argument("--cg-tol", type=float, default=1e-6, help="--large: CG's tol")
    parser.add_argument("--cg-max-iter", type=int, default=100, help="--large: its max_iter")
    parser.add_argument(
        "--stopping",
        action="store_true",
        help="only the stopping rule and the budget on the --hidden MLP",
    )
    parser.add_argument("--hidden", type=int, default=2000, help="--stopping: hidden width")
    parser.add_argument(
        "--sketch-memory",
        type=int,
        help="only the preconditioner's memory at this max_memory (bytes)",
    )
    parser.add_argument("--trace-only", action="store_true", help="--stopping: only the trace")
    parser.add_argument("--no-trace", action="store_true", help="--stopping: no trace")
    parser.add_argument("--save-trace", help="--stopping: save the trace's probe scores here")
    parser.add_argument("--cache", help="--stopping: folder that keeps the reference solve")
    parser.add_argument("--child", choices=["kernel", "cg", "lissa"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(large_child(args)), flush=True)
        return
    if args.large:
        large(args)
        return
    if args.stopping:
        stopping(args)
        return
    if args.sketch_memory:
        sketch_memory(args)
        return
    model, train, val = float32(*fitted_digits("mlp"))
    for damping in (1e-2, 1e-3, 1e-4):
        print(f"digits MLP 64-32-10 (2,410 parameters), damping {damping:g}, 20 validation points")
        compare(model, train, val, damping, 20, [LiSSA(), CG()])
    print("digits MLP at its L2 optimum, curvature='hessian', damping 0.01, 20 validation points")
    compare(model, train, val, 1e-2, 20, [LiSSA(), CG()], curvature="hessian")
    if args.cnn:
        import lightning as L
        from digits import DigitsCNN, DigitsDataModule

        L.seed_everything(0)
        data, cnn = DigitsDataModule(), DigitsCNN()
        trainer = L.Trainer(max_epochs=8, enable_progress_bar=False, logger=False,
                            enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(cnn, data)
        print("digits CNN (1,898 parameters), damping 1e-3, 64 validation points")
        train_set, val_set = data.train_dataloader().dataset, data.val_dataloader().dataset
        compare(cnn.eval(), train_set, val_set, 1e-3, 64, [LiSSA()])


# ------------------------------------------------------------ --large: the 1M-parameter MLP
LARGE_DAMPING = 1e-3


def large_model(n_train: int) -> tuple[torch.nn.Module, Any]:
    """``synthetic.py``'s ``100 -> 9000 -> 10`` ReLU MLP (999,010 parameters) and its training
    set, before training."""
    from synthetic import HIDDEN_1M, SyntheticClassification, wide_mlp

    return wide_mlp(HIDDEN_1M), SyntheticClassification(n_train, seed=0)


def large(args: argparse.Namespace) -> None:
    """Train the MLP for one SGD epoch as ``synthetic.py epoch`` does (batch 64, lr 0.01, weight
    decay = damping, shuffled with a fixed seed), then run, each in a fresh child process (its
    own peak RSS): the exact kernel solve (the reference), ``CG`` at ``--cg-tol`` /
    ``--cg-max-iter`` and the default ``LiSSA()``. Compares the solved vectors
    ``(G + damping I)^-1 g_val`` (``|x - ref| / |ref|``, the largest over validation points) and
    the scores of every training point (Pearson / Spearman against the reference's).

    At ``damping=1e-3`` this curvature's condition number is several times 1e4: ``CG``'s
    residual is still above 1e-2 after 100 full passes (its error is far smaller), so the
    reference is the kernel solve, whose residual is checked with the package's own curvature
    products. Its ``[10 n, 10 n]`` kernel limits ``n`` to a few thousand (3.2 GB of float64 at
    2,000). ``score_error`` is ``|s - s_ref| / |s_ref|`` over the training points' scores, the
    largest over validation points: what a ranking sees of the solved vectors' error.
    """
    from synthetic import sgd_epoch
    from torch.utils.data import DataLoader

    model, train = large_model(args.n_train)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=LARGE_DAMPING)
    loader = DataLoader(train, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    wall, _ = sgd_epoch(model, loader, opt)
    print(f"trained one epoch on {args.n_train:,} points in {wall:.1f} s")
    rows, solved = {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        torch.save(model.state_dict(), Path(workdir) / "model.pt")
        for name in ("kernel", "cg", "lissa"):
            child_args = ["--child", name, "--workdir", workdir, "--n-train", str(args.n_train),
                          "--n-val", str(args.n_val), "--cg-tol", str(args.cg_tol),
                          "--cg-max-iter", str(args.cg_max_iter)]  # fmt: skip
            row = run_child("lissa.py", child_args, MALLOC_ENV, timeout=None)
            print(name, json.dumps(row), flush=True)
            rows[name] = row
            solved[name] = torch.load(Path(workdir) / f"{name}.pt").double()
    ref = solved["kernel"]
    scores = large_scores(model, train, torch.cat(list(solved.values())))
    ref_scores = scores[:, : args.n_val]
    for j, (row, x) in enumerate(zip(rows.values(), solved.values(), strict=True)):
        est_scores = scores[:, j * args.n_val : (j + 1) * args.n_val]
        a = agreement(ref_scores, est_scores)
        score_error = (est_scores - ref_scores).norm(dim=0) / ref_scores.norm(dim=0)
        row.update(relative_error=float(((x - ref).norm(dim=1) / ref.norm(dim=1)).max()),
                   score_error=float(score_error.max()), pearson=f"{a['pearson']:.5f}",
                   spearman=f"{a['spearman']:.5f}",
                   time_vs_cg=row["wall_s"] / rows["cg"]["wall_s"])  # fmt: skip
    columns = ["solver", "relative_error", "score_error", "pearson", "spearman", "wall_s",
               "time_vs_cg", "steps",
               "relative_residual", "true_relative_residual", "rank", "condition_beyond_rank",
               "rank_limited_by_memory", "preconditioned_condition", "final_batch_size",
               "baseline_rss_mb", "peak_rss_mb"]  # fmt: skip
    table(list(rows.values()), columns, f"1M-parameter MLP, {args.n_train:,} training points, "
          f"{args.n_val} validation points, damping {LARGE_DAMPING:g}, Gauss-Newton; errors "
          "against the kernel solve")  # fmt: skip
    top = rows["lissa"]["diagnostics"].get("preconditioner_max_eigenvalue")
    if top is not None:  # LiSSA's sketch estimates the largest eigenvalue
        print(f"largest eigenvalue {top:.3g} (LiSSA's sketch): condition number "
              f"{(top + LARGE_DAMPING) / LARGE_DAMPING:.3g}")  # fmt: skip
    for row in rows.values():
        for message in row["warnings"]:
            print(f"{row['solver']} warned: {message}")


def large_scores(model: torch.nn.Module, train: Any, solved: Tensor) -> Tensor:
    """Scores ``-g_train . s`` of every training point for each solved vector ``s``."""
    from lightning_influence.core.data import as_indexed
    from lightning_influence.core.model import FunctionalModel
    from lightning_influence.core.scores import example_pass
    from lightning_influence.core.task import ClassificationTask

    fm = FunctionalModel(model.eval(), ClassificationTask())
    scores = example_pass(fm, as_indexed(train, None, 64), solved.to(fm.dtype)).scores
    assert scores is not None
    return scores


def kernel_solve(model: torch.nn.Module, train: Any, grads: Tensor, damping: float) -> Tensor:
    """``(G + damping I)^-1 g`` for each row of ``grads``, exactly, in float64, for the
    ``Linear -> ReLU -> Linear`` classifier: ``G = B^T B / n`` with ``B`` the output Jacobians
    ``J_i`` times the square roots ``L_i`` of the softmax cross-entropy Hessians, so by Woodbury
    ``(G + d I)^-1 g = (g - B^T (n d I + B B^T)^-1 B g) / d``, an ``[n k, n k]`` system whose
    kernel ``J J^T`` has a closed form for this architecture (``k`` = 10 classes).

    Used as the reference where ``CG`` on all ``p`` parameters cannot converge in the time
    available; the caller checks its residual with the package's own curvature products.
    """
    first, second = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    w1, b1, w2, b2 = (t.detach().double() for t in (first.weight, first.bias,
                                                     second.weight, second.bias))  # fmt: skip
    n, k, hidden = len(train), w2.shape[0], w2.shape[1]
    x = torch.stack([train[i][0] for i in range(n)]).double()
    z = x @ w1.T + b1
    mask, h = (z > 0).double(), z.clamp_min(0)
    probs = torch.softmax(h @ w2.T + b2, dim=1)
    hess = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    evals, evecs = torch.linalg.eigh(hess)
    roots = evecs @ torch.diag_embed(evals.clamp_min(0).sqrt()) @ evecs.transpose(1, 2)
    # J J^T[(i,a),(j,b)] = delta_ab (h_i.h_j + 1) + (x_i.x_j + 1) sum_u W2[a,u] W2[b,u] m_iu m_ju
    a = (mask[:, None, :] * w2[None]).reshape(n * k, hidden)
    ntk = (a @ a.T).view(n, k, n, k)
    del a
    ntk *= (x @ x.T + 1)[:, None, :, None]
    ntk += (h @ h.T + 1)[:, None, :, None] * torch.eye(k, dtype=torch.float64)[None, :, None, :]
    ntk = torch.einsum("iab,ibjc,jcd->iajd", roots, ntk, roots).reshape(n * k, n * k)
    ntk.diagonal().add_(n * damping)
    chol = torch.linalg.cholesky(ntk)
    del ntk
    g = grads.double()
    shapes = [w1.shape, b1.shape, w2.shape, b2.shape]
    out = []
    for row in g:
        parts = row.split([shape.numel() for shape in shapes])
        gw1, gb1, gw2, gb2 = (part.view(shape) for part, shape in zip(parts, shapes, strict=True))
        jg = h @ gw2.T + gb2 + (mask * (x @ gw1.T + gb1)) @ w2.T  # [n, k]: J_i g
        rhs = torch.einsum("iab,ib->ia", roots, jg).reshape(n * k, 1)
        u = torch.einsum("iab,ib->ia", roots, torch.cholesky_solve(rhs, chol).view(n, k))
        back = (u @ w2) * mask  # B^T w = J^T (L w), by the chain rule through both layers
        btw = torch.cat([(back.T @ x).reshape(-1), back.sum(0), (u.T @ h).reshape(-1), u.sum(0)])
        out.append((row - btw) / damping)
    return torch.stack(out)


def large_child(args: argparse.Namespace) -> dict[str, Any]:
    """One solve on the trained MLP: solved vectors saved to ``workdir``, its figures returned.

    ``kernel`` is :func:`kernel_solve`, ``cg`` the package's ``CG`` with ``--cg-tol`` and
    ``--cg-max-iter``, ``lissa`` the default ``LiSSA()``. Peak RSS is the child's own
    (``ru_maxrss``), before and after the solve. The true relative residual
    ``|g - (G + damping I) x| / |g|`` comes from one more product of the package's curvature in
    float64, outside the timing.
    """
    from synthetic import SyntheticClassification, peak_rss_mb

    from lightning_influence.core.curvature import Curvature
    from lightning_influence.core.data import as_indexed
    from lightning_influence.core.model import FunctionalModel
    from lightning_influence.core.scores import example_pass
    from lightning_influence.core.task import ClassificationTask

    model, train = large_model(args.n_train)
    model.load_state_dict(torch.load(Path(args.workdir) / "model.pt"))
    fm = FunctionalModel(model.eval(), ClassificationTask())
    val = as_indexed(SyntheticClassification(args.n_val, seed=1), None, 64)
    grads = example_pass(fm, val, keep_gradients=True).gradients
    assert grads is not None
    curvature = Curvature(fm, as_indexed(train, None, 1024), "gauss_newton")
    solver: Solver = LiSSA() if args.child == "lissa" else CG(args.cg_max_iter, args.cg_tol)
    baseline = peak_rss_mb()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        info: dict[str, float] = {}
        if args.child == "kernel":
            x = kernel_solve(model, train, grads, LARGE_DAMPING)
        else:
            x, info = solver.solve(curvature, grads, LARGE_DAMPING)
        wall = time.perf_counter() - t0
    peak = peak_rss_mb()
    torch.save(x, Path(args.workdir) / f"{args.child}.pt")
    fm64 = FunctionalModel(model, ClassificationTask(), dtype=torch.float64)
    curvature64 = Curvature(fm64, as_indexed(train, None, 1024), "gauss_newton")
    g, x = grads.double(), x.double()
    r = g - curvature64.matvec(x) - LARGE_DAMPING * x
    names = {"kernel": "kernel solve (reference)", "cg": repr(solver), "lissa": "LiSSA()"}
    return {
        "solver": names[args.child],
        "n_params": fm.n_params,
        "wall_s": wall,
        "steps": info.get("steps"),
        "relative_residual": info.get("relative_residual"),
        "true_relative_residual": float((r.norm(dim=1) / g.norm(dim=1)).max()),
        "rank": info.get("preconditioner_rank"),
        "condition_beyond_rank": info.get("preconditioner_condition_beyond_rank"),
        "rank_limited_by_memory": info.get("preconditioner_rank_limited_by_memory"),
        "preconditioned_condition": info.get("preconditioned_condition_number"),
        "final_batch_size": info.get("final_batch_size"),
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "warnings": [str(w.message) for w in caught if w.category is UserWarning],
        "diagnostics": info,
    }


# ------------------------------------------------- --stopping: stop on the answer, a budget
def stopping(args: argparse.Namespace) -> None:
    """The ``100 -> hidden -> 10`` MLP (``--hidden 2000``: 222k parameters) after one SGD epoch on
    ``--n-train`` points, ``--n-val`` validation points, damping 1e-3, all in one process: the
    kernel solve (reference), then ``LiSSA(probe_examples=0, residual_tol=3e-3)`` (the residual
    rule alone, the former default), ``LiSSA()`` (stop on the scores) and ``LiSSA()`` with a
    budget of half the former's epochs. Epochs are each solve's seconds over one SGD epoch's,
    timed in the same run (above 3,000 points the reference is
    ``LiSSA(probe_examples=0, residual_tol=1e-4)``: the kernel would not fit). Then one solve
    traced to ``residual_tol=1e-4``: at each check, the
    stopping rule's estimate of the scores' distance to converged (values, ranks) and the
    Pearson / Spearman of all training scores at that iterate against the reference, which
    shows where each ``tol`` would stop."""
    from synthetic import SyntheticClassification, sgd_epoch, wide_mlp
    from torch.utils.data import DataLoader

    from lightning_influence.core.curvature import Curvature
    from lightning_influence.core.data import as_indexed
    from lightning_influence.core.model import FunctionalModel
    from lightning_influence.core.scores import example_pass
    from lightning_influence.core.task import ClassificationTask
    from lightning_influence.solvers.stopping import Stopping

    model, train = wide_mlp(args.hidden), SyntheticClassification(args.n_train, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=LARGE_DAMPING)
    loader = DataLoader(train, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    sgd_epoch(model, loader, opt)
    timings = [sgd_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.0))
               for _ in range(3)]  # fmt: skip  # lr 0: timing only
    epoch_s, epoch_cpu_s = min(t[0] for t in timings), min(t[1] for t in timings)
    fm = FunctionalModel(model.eval(), ClassificationTask())
    n_params = fm.n_params
    grads = example_pass(fm, as_indexed(SyntheticClassification(args.n_val, seed=1), None, 64),
                         keep_gradients=True).gradients  # fmt: skip
    assert grads is not None
    curvature = Curvature(fm, as_indexed(train, None, 1024), "gauss_newton")
    print(f"{n_params:,} parameters, {args.n_train:,} points; one SGD epoch {epoch_s:.3f} s",
          flush=True)  # fmt: skip
    t0 = time.perf_counter()
    cached = Path(args.cache or "") / f"reference_{args.hidden}_{args.n_train}_{args.n_val}.pt"
    reference = "kernel solve"
    if args.cache and cached.exists():
        ref = torch.load(cached)
    elif args.n_train > 3000:  # the kernel would not fit: a solve to a 30 times tighter residual
        reference = "LiSSA(probe_examples=0, residual_tol=1e-4) solve"
        ref = LiSSA(probe_examples=0, residual_tol=1e-4).solve(curvature, grads, LARGE_DAMPING)[0]
    else:
        ref = kernel_solve(model, train, grads, LARGE_DAMPING).to(fm.dtype)
        if args.cache:
            torch.save(ref, cached)
    print(f"reference solve {time.perf_counter() - t0:.1f} s", flush=True)
    ref_scores = large_scores(model, train, ref)
    rows = []
    former = LiSSA(probe_examples=0, residual_tol=3e-3)
    runs: list[tuple[str, LiSSA]] = [("LiSSA(probe_examples=0, residual_tol=3e-3)", former),
                                     ("LiSSA()", LiSSA())]  # fmt: skip
    if args.trace_only:
        runs = []
    for name, solver in [*runs, ("budget", LiSSA())] if runs else []:
        if name == "budget":  # half the former rule's epochs
            epochs = rows[0]["cpu_epochs"] / 2
            name, solver = f"LiSSA(budget_epochs={epochs:.0f})", LiSSA(budget_epochs=epochs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0, cpu0 = time.perf_counter(), time.process_time()
            x, info = solver.solve(curvature, grads, LARGE_DAMPING)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        a = agreement(ref_scores, large_scores(model, train, x))
        rows.append({"solver": name, "steps": info["steps"], "wall_s": wall, "cpu_s": cpu,
                     "epochs": wall / epoch_s, "cpu_epochs": cpu / epoch_cpu_s,
                     "pearson": f"{a['pearson']:.4f}",
                     "spearman": f"{a['spearman']:.4f}",
                     "relative_residual": info["relative_residual"],
                     "score_distance": info.get("score_distance"),
                     "score_rank_distance": info.get("score_rank_distance"),
                     "warned": len([w for w in caught if w.category is UserWarning])})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    if rows:
        table(rows, list(rows[0]), f"{n_params:,}-parameter MLP, {args.n_train:,} points, "
              f"{args.n_val} validation points, damping {LARGE_DAMPING:g}; one SGD epoch "
              f"{epoch_s:.3f} s; scores against the {reference}")  # fmt: skip
    if args.no_trace:
        return
    # the trace: every check of one long solve
    trace: list[tuple[int, Tensor, float, float, float]] = []
    probes: list[Tensor | None] = []  # the probe's scores at each check
    check = Stopping.check

    def traced(self: Stopping, x: Tensor, rel: Tensor, steps: int, moved: bool = True) -> bool:
        done = check(self, x, rel, steps, moved)
        values, ranks = self.estimate()
        trace.append((steps, x.clone(), values, ranks, self.residual))
        probes.append(self.last_scores if moved or self.last_scores is None else probes[-1])
        return done

    Stopping.check = traced  # type: ignore[method-assign]
    LiSSA(tol=1e-9, residual_tol=1e-4).solve(curvature, grads, LARGE_DAMPING)
    Stopping.check = check  # type: ignore[method-assign]
    scores = large_scores(model, train, torch.cat([t[1] for t in trace]))
    m = grads.shape[0]
    trace_rows = []
    for i, (steps, _, values, ranks, rel) in enumerate(trace):
        a = agreement(ref_scores, scores[:, i * m : (i + 1) * m])
        trace_rows.append({"steps": steps, "estimate_values": values, "estimate_ranks": ranks,
                           "residual": rel, "pearson": f"{a['pearson']:.4f}",
                           "spearman": f"{a['spearman']:.4f}"})  # fmt: skip
    table(trace_rows, list(trace_rows[0]), "each check of LiSSA(tol=1e-9, residual_tol=1e-4)")
    if args.save_trace:  # to try other stopping rules on the same checks
        torch.save({"rows": trace_rows, "probes": probes}, args.save_trace)


def sketch_memory(args: argparse.Namespace) -> None:
    """Peak RSS growth of LiSSA's default preconditioner factorization with
    ``max_memory=--sketch-memory`` on the ``100 -> --hidden -> 10`` MLP (before training) and
    2,000 points, after a warm-up product of 8 vectors (the products' own memory is mostly in
    the baseline then). One process per value: the peak is this process's."""
    from synthetic import peak_rss_mb, stacked, wide_mlp

    from lightning_influence.core.curvature import Curvature
    from lightning_influence.core.data import as_indexed
    from lightning_influence.core.model import FunctionalModel
    from lightning_influence.core.task import ClassificationTask
    from lightning_influence.solvers.preconditioner import PRECONDITIONER

    fm = FunctionalModel(wide_mlp(args.hidden).eval(), ClassificationTask())
    curvature = Curvature(fm, as_indexed(stacked(2000), None, 1024))
    curvature.matvec(torch.randn(8, fm.n_params))
    base, cpu = peak_rss_mb(), time.process_time()
    lowrank = replace(PRECONDITIONER, max_memory=args.sketch_memory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rank limited by memory, as intended
        _, info = lowrank.factorize(curvature, LARGE_DAMPING)
    print(f"max_memory {args.sketch_memory / 2**20:,.0f} MiB: rank {info['rank']:.0f}, "
          f"{info['matvecs']:.0f} products, peak RSS +{peak_rss_mb() - base:,.0f} MiB over "
          f"{base:,.0f} MiB, {time.process_time() - cpu:.1f} CPU s")  # fmt: skip


if __name__ == "__main__":
    main()
