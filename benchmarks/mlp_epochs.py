"""``LiSSA()`` at its defaults in SGD epochs, against kronfluence's EK-FAC in the same run.

``synthetic.py``'s ReLU MLP ``100 -> --hidden -> 10`` (``--hidden 2000``: 222k parameters,
``9000``: 1M) after one SGD epoch on ``--n-train`` points, as ``lissa.py --stopping`` trains it;
``--n-val`` validation points, damping 1e-3, one intra-op thread, all in one process:

1. one SGD epoch's time (best of three, learning rate 0: a timing only);
2. ``compute_influence`` with ``LiSSA()`` (the whole call), its time in those epochs;
3. kronfluence's EK-FAC as ``ekfac.py`` calls it (factors and pairwise scores), when importable;
4. the reference: ``compute_influence`` with ``LiSSA(probe_examples=0, residual_tol=1e-4)``
   (30 times tighter than the former default's residual), kept under ``--cache`` to reuse.

Prints Pearson / Spearman of each against the reference, the times and their ratio. Run it with
``benchmarks/.venv-peers/bin/python`` for kronfluence:

    benchmarks/.venv-peers/bin/python benchmarks/mlp_epochs.py --n-train 10000 --n-val 8
    python benchmarks/mlp_epochs.py --hidden 9000 --no-kronfluence --no-reference   # times only

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Clock, agreement

import lightning_influence as li


def influence(model: Any, train: Any, val: Any, solver: li.Solver) -> tuple[Any, float, float]:
    """``compute_influence`` with ``solver``: the result, wall and CPU seconds."""
    from lissa import LARGE_DAMPING

    clock = Clock()
    result = li.compute_influence(model, train, val, solver=solver, damping=LARGE_DAMPING,
                                  self_influence=False, progress=False)  # fmt: skip
    wall, cpu = clock.read()
    return result, wall, cpu


def trained(hidden: int, n_train: int) -> tuple[Any, float, float]:
    """The MLP after one SGD epoch, and one epoch's wall and CPU
    seconds (best of three at learning rate 0)."""
    from lissa import LARGE_DAMPING
    from synthetic import SyntheticClassification, sgd_epoch, wide_mlp
    from torch.utils.data import DataLoader

    model = wide_mlp(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=LARGE_DAMPING)
    loader = DataLoader(SyntheticClassification(n_train, seed=0), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    sgd_epoch(model, loader, opt)
    timings = [sgd_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.0))
               for _ in range(3)]  # fmt: skip  # lr 0: timing only
    return model.eval(), min(t[0] for t in timings), min(t[1] for t in timings)


def reference_scores(
    model: Any, train: Any, val: Any, solver: li.Solver, cached: Path | None
) -> torch.Tensor:
    """The scores of a tight ``solver`` run, kept in ``cached`` (read from it when it exists)."""
    if cached is not None and cached.exists():
        return torch.load(cached)  # type: ignore[no-any-return]
    result, wall, _ = influence(model, train, val, solver)
    print(f"reference {wall:.1f} s, {result.diagnostics.get('solver_steps')} steps", flush=True)
    scores = result.scores.double()
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(scores, cached)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2000)
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--n-val", type=int, default=8)
    parser.add_argument("--no-kronfluence", action="store_true")
    parser.add_argument("--cache", help="folder that keeps the reference scores")
    parser.add_argument("--no-reference", action="store_true", help="times only, no Pearson")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from lissa import LARGE_DAMPING
    from synthetic import stacked

    model, epoch_s, epoch_cpu_s = trained(args.hidden, args.n_train)
    train, val = stacked(args.n_train, seed=0), stacked(args.n_val, seed=1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters, {args.n_train:,} points, {args.n_val} validation points; "
          f"one SGD epoch {epoch_s:.3f} s (CPU {epoch_cpu_s:.3f} s)", flush=True)  # fmt: skip

    rows: list[dict[str, Any]] = []
    scores: dict[str, torch.Tensor] = {}
    result, wall, cpu = influence(model, train, val, li.LiSSA())
    d = result.diagnostics
    scores["LiSSA()"] = result.scores.double()
    rows.append({"method": "LiSSA()", "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                 "epochs": round(wall / epoch_s), "cpu_epochs": round(cpu / epoch_cpu_s),
                 **{k[7:]: v for k, v in d.items() if k.startswith("solver_")}})  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    if not args.no_kronfluence:
        from ekfac import kronfluence

        try:
            out = kronfluence(model, train, val, LARGE_DAMPING, False)
        except ImportError as exc:
            print(f"kronfluence skipped: {exc}", flush=True)
        else:
            scores["kronfluence EK-FAC"] = out["scores"].double()
            rows.append({"method": "kronfluence EK-FAC", "wall_s": round(out["wall_s"], 1),
                         "cpu_s": round(out["cpu_s"], 1),
                         "epochs": round(out["wall_s"] / epoch_s),
                         "cpu_epochs": round(out["cpu_s"] / epoch_cpu_s)})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    cached = (
        Path(args.cache) / f"mlp_epochs_{args.hidden}_{args.n_train}_{args.n_val}.pt"
        if args.cache
        else None
    )
    reference = li.LiSSA(probe_examples=0, residual_tol=1e-4)
    ref = None if args.no_reference else reference_scores(model, train, val, reference, cached)
    for row in rows if ref is not None else []:
        a = agreement(ref, scores[row["method"]])
        row.update(pearson=round(a["pearson"], 4), spearman=round(a["spearman"], 4))
    if len(rows) > 1:
        rows[0]["time_vs_kronfluence"] = round(rows[0]["wall_s"] / rows[1]["wall_s"], 3)
        rows[0]["cpu_vs_kronfluence"] = round(rows[0]["cpu_s"] / rows[1]["cpu_s"], 3)
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"params": n_params, "n_train": args.n_train, "n_val": args.n_val,
                      "epoch_s": epoch_s, "epoch_cpu_s": epoch_cpu_s, "rows": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
