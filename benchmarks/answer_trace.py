"""When has the answer a user looks at converged? ``LiSSA`` on GPT-2, traced check by check.

The model and corpus of ``gpt2_facts.py`` (GPT-2 from a config, planted facts). ``run`` solves
with ``LiSSA`` and records, at every check of its stopping rule (``Stopping.check``, patched here:
each minibatch window and each conjugate-gradient step), the steps, the seconds and Lightning
epochs since the start (the preconditioner's sketch included, the recording itself excluded),
the relative residual of every row, the rule's estimate, and the scores of all training
sequences at that iterate (``-G x^T`` with the per-sample gradients ``G`` taken once). ``table``
reads saved runs and prints, per check: the share of the answered facts whose stating sequence
ranks first among the helpful (raw scores, as ``planted_facts.rank_of`` and ``gpt2_facts.py``
count it, and relative ones), the top-5 overlap and the Spearman / Pearson of all scores
against a reference run's final scores, then when each criterion is reached for good and when
each query's top-1 and top-5 stop changing. One intra-op thread; needs ``transformers``.

    python benchmarks/answer_trace.py run --save /tmp/gpt2/default.pt --max-seconds 1500
    python benchmarks/answer_trace.py run --sketch-memory 134217728 --save /tmp/gpt2/cheap.pt
    python benchmarks/answer_trace.py table /tmp/gpt2/default.pt /tmp/gpt2/cheap.pt
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from copy import deepcopy as copy_module
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

import lightning_influence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt2_facts import LanguageModel, add_arguments, build  # also puts examples/ on the path
from planted_facts import answers, rank_of

from lightning_influence import LanguageModelingTask, LiSSA, LowRank, compute_influence
from lightning_influence.core.data import as_indexed
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.scores import example_pass
from lightning_influence.result import relative_denominators
from lightning_influence.solvers.preconditioner import PRECONDITIONER
from lightning_influence.solvers.stopping import Stopping

SPEARMAN, PEARSON, TOP = 0.97, 0.99, 5


# ----------------------------------------------------------------------------------- run
def epoch_seconds(module: LanguageModel, train: Dataset[Any], repeats: int = 3) -> float:
    """The fastest of ``repeats`` Lightning epochs of a copy of ``module`` at learning rate 0 (in
    this run, so that epochs and the solve see the same machine load)."""
    times = []
    for _ in range(repeats):
        copy = LanguageModel(copy_module(module.model), lr=0.0)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                            enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=False)  # fmt: skip
        started = time.perf_counter()
        trainer.fit(copy, DataLoader(train, batch_size=32, shuffle=True))
        times.append(time.perf_counter() - started)
    return min(times)


def run(args: argparse.Namespace) -> None:
    built = build(args, args.weights)
    module, train, queries = built.module, built.train, built.queries
    correct = answers(module, built.corpus, queries)
    built.epoch_s = epoch_seconds(module, train)
    module.eval()
    print(f"package {Path(lightning_influence.__file__).parent}; "
          f"{built.n_params:,} parameters, {len(train)} sequences, {len(queries)} queries "
          f"({sum(correct)} answered); one epoch {built.epoch_s:.3f} s (lr 0, fastest of 3)",
          flush=True)  # fmt: skip
    fm = FunctionalModel(module, LanguageModelingTask())
    grads = example_pass(fm, as_indexed(train, None, 64), keep_gradients=True).gradients
    assert grads is not None
    preconditioner = PRECONDITIONER
    if args.sketch_memory or args.rank:
        preconditioner = LowRank(max_examples=1024, output_directions=None, max_condition=5.0,
                                 max_memory=args.sketch_memory or 2**30,
                                 rank=args.rank or "auto")  # fmt: skip
    solver = LiSSA(preconditioner=preconditioner, depth=args.max_steps,
                   budget_seconds=args.max_seconds, batch_size=args.batch_size)  # fmt: skip

    rows: list[dict[str, Any]] = []
    scores: list[Tensor] = []
    residuals: list[Tensor] = []
    recording = [0.0]  # seconds spent recording, taken off the clock
    check = Stopping.check

    def save(extra: dict[str, Any]) -> None:
        torch.save({"args": {k: str(v) for k, v in vars(args).items()}, "epoch_s": built.epoch_s,
                    "rows": rows, "scores": torch.stack(scores),
                    "residuals": torch.stack(residuals), "stating": built.corpus.stating,
                    "correct": correct, "package": str(Path(lightning_influence.__file__).parent),
                    **extra}, args.save)  # fmt: skip

    def traced(self: Stopping, x: Tensor, rel: Tensor, steps: int, moved: bool = True) -> bool:
        done = check(self, x, rel, steps, moved)
        t = time.perf_counter()
        seconds = t - started - recording[0]
        values, ranks = self.estimate()
        rows.append({"steps": steps, "seconds": seconds, "epochs": seconds / built.epoch_s,
                     "residual": self.residual, "estimate": values,
                     "estimate_ranks": ranks})  # fmt: skip
        scores.append(-(grads @ x.to(grads.dtype).T))
        residuals.append(rel.detach().double().cpu().clone())
        if len(rows) % 10 == 0:  # a partial trace to read while the solve goes on
            save({"partial": True, "self_influence": None})
        if args.verbose:
            print(f"step {steps:4d} {seconds:7.1f} s residual {self.residual:.2e} "
                  f"estimate {values:.3g} / {ranks:.3g}", flush=True)  # fmt: skip
        recording[0] += time.perf_counter() - t
        return done

    Stopping.check = traced  # type: ignore[method-assign, assignment]
    started = time.perf_counter()
    try:
        result = compute_influence(module, train, queries, task=LanguageModelingTask(),
                                   solver=solver, damping=args.damping, progress=False)  # fmt: skip
    finally:
        Stopping.check = check  # type: ignore[method-assign]
    total = time.perf_counter() - started - recording[0]
    assert result.self_influence is not None
    # the last check's iterate is the solution scored: the two scorings must agree
    gap = float((scores[-1] - result.scores).norm() / result.scores.norm())
    d = result.diagnostics
    print(f"{len(rows)} checks, {rows[-1]['steps']} steps, {total:.0f} s = "
          f"{total / built.epoch_s:.0f} epochs; preconditioner rank "
          f"{d.get('self_influence_rank', d.get('solver_preconditioner_rank'))}; relative gap "
          f"between the traced and the package's scores {gap:.1e}", flush=True)  # fmt: skip
    if gap > 1e-3:
        raise RuntimeError(f"traced scores differ from the package's by {gap:.1e}")
    save({"self_influence": result.self_influence, "diagnostics": d, "total_seconds": total})
    print(f"saved {args.save}")


# ----------------------------------------------------------------------------------- table
def _ranks(t: Tensor) -> Tensor:
    return t.argsort(dim=0).argsort(dim=0).double()


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-300)


def _top(t: Tensor, k: int) -> Tensor:
    """The ``k`` most helpful (lowest) rows of each column, as a sorted ``[k, columns]``."""
    return t.topk(k, dim=0, largest=False).indices.sort(dim=0).values


def _overlap(a: Tensor, b: Tensor, k: int) -> float:
    ta, tb = _top(a, k), _top(b, k)
    return float(sum(len(set(ta[:, j].tolist()) & set(tb[:, j].tolist()))
                     for j in range(a.shape[1])) / (k * a.shape[1]))  # fmt: skip


def _for_good(ok: list[bool]) -> int | None:
    """Index of the first check from which ``ok`` holds to the end (None: never)."""
    i = len(ok)
    while i > 0 and ok[i - 1]:
        i -= 1
    return i if i < len(ok) else None


def _stable_from(tops: Tensor) -> list[int]:
    """Per column, the first check from which ``tops[check, :, column]`` stays the final one."""
    same = (tops == tops[-1]).all(dim=1)  # [checks, columns]
    return [_for_good(same[:, j].tolist()) or 0 for j in range(tops.shape[2])]


def denominators(run: dict[str, Any], ref: dict[str, Any]) -> Tensor:
    """``sqrt(self_influence)`` of ``run`` (of ``ref`` for a partial trace, else ones)."""
    si = run.get("self_influence")
    si = si if si is not None else ref.get("self_influence")
    if si is None:
        return torch.ones(run["scores"].shape[1], dtype=torch.float64)
    return relative_denominators(si).double()


def trace_table(run: dict[str, Any], ref: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per check: the answer's metrics against ``ref``'s final scores."""
    stating, correct = run["stating"], run["correct"]
    answered = [j for j, ok in enumerate(correct) if ok]
    den = denominators(run, ref)[:, None]
    ref_raw = ref["scores"][-1].double()
    ref_rel = ref_raw / denominators(ref, ref)[:, None]
    ref_ranks = _ranks(ref_raw)
    out = []
    for row, s in zip(run["rows"], run["scores"], strict=True):
        raw = s.double()
        rel = raw / den
        spearman = _pearson(_ranks(raw), ref_ranks)
        pearson = _pearson(raw, ref_raw)
        first = [rank_of(raw[:, j], stating[j], True) == 1 for j in answered]
        first_rel = [rank_of(rel[:, j], stating[j], True) == 1 for j in answered]
        out.append({**row, "first": sum(first) / len(answered),
                    "first_relative": sum(first_rel) / len(answered),
                    "top5": _overlap(raw, ref_raw, TOP),
                    "top5_relative": _overlap(rel, ref_rel, TOP),
                    "top1": _overlap(raw, ref_raw, 1),
                    "spearman_min": float(spearman.min()), "spearman_mean": float(spearman.mean()),
                    "pearson_min": float(pearson.min())})  # fmt: skip
    return out


def summary(
    run: dict[str, Any], ref: dict[str, Any], table: list[dict[str, Any]]
) -> dict[str, Any]:
    """Where each criterion is reached for good (steps, epochs, and seconds in units of the run's
    median one-step check interval: comparable across runs on a loaded machine), and when tops
    settle."""
    gaps = [b["seconds"] - a["seconds"] for a, b in itertools.pairwise(table)
            if b["steps"] == a["steps"] + 1]  # fmt: skip
    step_s = float(torch.tensor(gaps).median()) if gaps else float("nan")

    def at(ok: list[bool]) -> dict[str, Any] | None:
        i = _for_good(ok)
        if i is None:
            return None
        row = table[i]
        return {"steps": row["steps"], "epochs": round(row["epochs"]),
                "step_equivalents": round(row["seconds"] / step_s, 1)}  # fmt: skip

    scores = run["scores"].double()
    den = denominators(run, ref)[None, :, None]
    out: dict[str, Any] = {
        "step_seconds": step_s,
        "start_step_equivalents": round(table[0]["seconds"] / step_s, 1),
        "first>=0.9": at([r["first"] >= 0.9 for r in table]),
        "first_relative>=0.9": at([r["first_relative"] >= 0.9 for r in table]),
        "top5_vs_reference>=0.9": at([r["top5"] >= 0.9 for r in table]),
        "top5_vs_reference=1": at([r["top5"] == 1.0 for r in table]),
        "top5_relative_vs_reference=1": at([r["top5_relative"] == 1.0 for r in table]),
        f"spearman_min>={SPEARMAN}": at([r["spearman_min"] >= SPEARMAN for r in table]),
        f"spearman_mean>={SPEARMAN}": at([r["spearman_mean"] >= SPEARMAN for r in table]),
        f"pearson_min>={PEARSON}": at([r["pearson_min"] >= PEARSON for r in table]),
    }
    steps = [r["steps"] for r in table]
    for name, s in (("raw", scores), ("relative", scores / den)):
        for k in (1, TOP):
            tops = s.topk(k, dim=1, largest=False).indices.sort(dim=1).values
            per_row = _stable_from(tops)
            out[f"top{k}_{name}_settled"] = at([i >= max(per_row) for i in range(len(steps))])
            out[f"top{k}_{name}_settled_per_row"] = [steps[i] for i in per_row]
    stating = torch.tensor(run["stating"])
    ranks = (scores < scores[:, stating, torch.arange(len(stating))][:, None]).sum(1) + 1
    out["stating_rank_settled_per_row"] = [steps[i] for i in _stable_from(ranks[:, None])]
    out["final_stating_rank"] = ranks[-1].tolist()
    # Rows that stopped at their own residual tolerance: the steps each takes, and the share of
    # the products (rows x steps) that would save against running every row to the slowest.
    res = run["residuals"]
    for tol in (1e-1, 3e-2, 1e-2):
        below = [_first_below(res[:, j].tolist(), tol) for j in range(res.shape[1])]
        if all(i is not None for i in below):
            per = [steps[i] for i in below if i is not None]
            start = steps[0] if len(steps) < 2 else steps[1] - 1  # the first step that is CG
            work = [max(p - start, 0) for p in per]
            saved = 1 - sum(work) / (len(work) * max(max(work), 1))
            out[f"rows_residual<={tol:g}"] = {"slowest": max(per), "fastest": min(per),
                                              "products_saved": round(saved, 3)}  # fmt: skip
            out[f"rows_residual<={tol:g}_per_row"] = per
    return out


def _first_below(values: list[float], tol: float) -> int | None:
    return next((i for i, v in enumerate(values) if v <= tol), None)


def per_row(run: dict[str, Any], s: dict[str, Any], marks: list[int]) -> None:
    """Per query: answered, settling steps, and its relative residual at some checks."""
    res, steps = run["residuals"], [r["steps"] for r in run["rows"]]
    print("\nper query: steps at which top-1 / top-5 (raw) and the stating rank settle, and "
          "the relative residual at checks " + ", ".join(str(steps[i]) for i in marks))  # fmt: skip
    for j in range(res.shape[1]):
        cells = " ".join(f"{float(res[i, j]):8.1e}" for i in marks)
        answered = "ans" if run["correct"][j] else "   "
        top5 = s["top5_raw_settled_per_row"][j]
        print(f"q{j:02d} {answered} rank {s['final_stating_rank'][j]:3d}"
              f" top1 {s['top1_raw_settled_per_row'][j]:4d} top5 {top5:4d}"
              f" (residual then {float(res[steps.index(top5), j]):7.1e})"
              f" rel.top5 {s['top5_relative_settled_per_row'][j]:4d}"
              f" stating {s['stating_rank_settled_per_row'][j]:4d} | {cells}")  # fmt: skip


def table(args: argparse.Namespace) -> None:
    runs = {p: torch.load(p, weights_only=False) for p in args.runs}
    ref_path = args.reference or max(runs, key=lambda p: runs[p]["rows"][-1]["steps"])
    ref = runs.get(ref_path) or torch.load(ref_path, weights_only=False)
    print(f"reference: final scores of {ref_path} ({ref['rows'][-1]['steps']} steps, residual "
          f"{ref['rows'][-1]['residual']:.2e})")  # fmt: skip
    report: dict[str, Any] = {"reference": Path(ref_path).stem}
    cols = ["steps", "epochs", "first", "first_relative", "top1", "top5", "top5_relative",
            "spearman_min", "spearman_mean", "pearson_min", "residual", "estimate"]  # fmt: skip
    for path, run in runs.items():
        rows = trace_table(run, ref)
        s = summary(run, ref, rows)
        print(f"\n{path}: {run['args']}\n" + " ".join(f"{c:>9}" for c in cols))
        for i, r in enumerate(rows):
            if i % args.every and i != len(rows) - 1:
                continue
            print(" ".join(f"{r[c]:9.0f}" if c in ("steps", "epochs") else f"{r[c]:9.3g}"
                           for c in cols))  # fmt: skip
        for k, v in s.items():
            shown = k.startswith("rows_residual") or not k.endswith("per_row")
            if shown and k != "final_stating_rank":
                print(f"  {k}: {v}")
        marks = sorted({0, *range(0, len(rows), max(1, len(rows) // 6)), len(rows) - 1})
        per_row(run, s, marks)
        kept = ("preconditioner_rank", "preconditioner_matvecs", "condition_beyond_rank",
                "preconditioned_condition_number", "solver_steps")  # fmt: skip
        diagnostics = {k: v for k, v in (run.get("diagnostics") or {}).items()
                       if k.startswith("solver_") and k.endswith(kept)}  # fmt: skip
        shown = [r for i, r in enumerate(rows) if i % args.every == 0 or i == len(rows) - 1]
        report[Path(path).stem] = {"args": run["args"], "epoch_s": run["epoch_s"],
                                   "diagnostics": diagnostics, "summary": s,
                                   "rows": [{c: r[c] for c in cols} for r in shown]}  # fmt: skip
    finals = {p: r["scores"][-1].double() for p, r in runs.items()}
    for p, f in finals.items():
        if p != ref_path and ref_path in finals:
            sp = _pearson(_ranks(f), _ranks(finals[ref_path]))
            print(f"final of {p} against the reference: Spearman min {float(sp.min()):.4f}, "
                  f"top-5 overlap {_overlap(f, finals[ref_path], TOP):.3f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="solve with LiSSA and record every check")
    add_arguments(r)
    r.add_argument("--weights", type=Path, default=Path("/tmp/gpt2/model.pt"),
                   help="trained weights: loaded if present, else saved after "
                   "training")  # fmt: skip
    r.add_argument("--sketch-memory", type=int, default=0, help="preconditioner max_memory")
    r.add_argument("--rank", type=int, default=0, help="preconditioner rank (0: auto)")
    r.add_argument("--batch-size", type=int, default=256,
                   help="LiSSA batch_size (above the 424 sequences: conjugate gradients from the "
                   "start)")  # fmt: skip
    r.add_argument("--max-steps", type=int, default=1000, help="LiSSA depth")
    r.add_argument("--max-seconds", type=float, default=1500.0, help="LiSSA budget_seconds")
    r.add_argument("--save", type=Path, required=True)
    r.add_argument("--verbose", action="store_true")
    t = sub.add_parser("table", help="the metrics of saved runs, check by check")
    t.add_argument("runs", nargs="+")
    t.add_argument("--reference", help="run whose final scores are the reference (default: "
                   "the one with the most steps)")  # fmt: skip
    t.add_argument("--every", type=int, default=5,
                   help="print (and write to --json) every n-th check")  # fmt: skip
    t.add_argument("--json", type=Path, help="write the tables and summaries here")
    args = parser.parse_args()
    run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    main()
