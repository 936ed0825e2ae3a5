"""``LiSSA()`` with its full-data products in float32 and in bfloat16 with residual replacement.

``synthetic.py``'s ReLU MLP ``100 -> --hidden -> 10`` (``--hidden 2000``: 222k parameters) after
one SGD epoch on each ``--n-train`` (as ``mlp_epochs.py`` trains it), ``--n-val`` validation
points, damping 1e-3, one intra-op thread, all in one process. For each size:

1. one SGD epoch's time (best of three, learning rate 0: a timing only);
2. ``compute_influence`` with ``LiSSA(product_dtype="float32")`` and with
   ``LiSSA(product_dtype="bfloat16")`` (the whole call): wall and CPU seconds, the seconds in
   epochs, the steps, the full-data products in each precision, residual replacements;
3. the reference: ``LiSSA(probe_examples=0, residual_tol=1e-4, product_dtype="float32")``,
   kept under ``--cache`` to reuse; Pearson / Spearman of every training score against it.

Prints a JSON line per run, a table per size and the ratio of bfloat16's time to float32's.
bfloat16 pays where the CPU multiplies it natively (AVX512-BF16 or AMX; ``lscpu``): elsewhere
autocast emulates it. Without residual replacement, the same bfloat16 products in plain conjugate
gradients stall short of the answer (``layerwise_products.py --bf16``; ``tests/test_refinement``).

    OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py --cache benchmarks/results/cache
    OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py --hidden 9000 --n-train 10000 \
        --no-reference                                   # the 1M MLP, times only
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import agreement, table
from mlp_epochs import influence, reference_scores, trained

import lightning_influence as li

REFERENCE = li.LiSSA(probe_examples=0, residual_tol=1e-4, product_dtype="float32")


def size(args: argparse.Namespace, n_train: int) -> list[dict[str, Any]]:
    """Both runs and the reference at ``n_train`` points: their rows."""
    from synthetic import stacked

    model, epoch_s, epoch_cpu_s = trained(args.hidden, n_train)
    train, val = stacked(n_train, seed=0), stacked(args.n_val, seed=1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters, {n_train:,} points, {args.n_val} validation points; one SGD "
          f"epoch {epoch_s:.3f} s (CPU {epoch_cpu_s:.3f} s)", flush=True)  # fmt: skip
    rows, scores = [], {}
    for dtype in args.dtypes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the preconditioner's rank held by its memory
            result, wall, cpu = influence(model, train, val, li.LiSSA(product_dtype=dtype))
        d = {k[7:]: v for k, v in result.diagnostics.items() if k.startswith("solver_")}
        scores[dtype] = result.scores.double()
        rows.append({"product_dtype": dtype, "n_train": n_train, "wall_s": round(wall, 1),
                     "cpu_s": round(cpu, 1), "epochs": round(wall / epoch_s),
                     "cpu_epochs": round(cpu / epoch_cpu_s), "steps": d["steps"],
                     "cg_steps": d["conjugate_gradient_steps"],
                     "bfloat16_products": d.get("bfloat16_products", 0.0),
                     "float32_products": d.get("float32_products"),
                     "replacements": d.get("residual_replacements"),
                     "fell_back": d.get("bfloat16_fell_back"),
                     "product_error": d.get("bfloat16_product_error"),
                     "relative_residual": d["relative_residual"]})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    cached = (
        Path(args.cache) / f"mixed_precision_{args.hidden}_{n_train}_{args.n_val}.pt"
        if args.cache
        else None
    )
    ref = None if args.no_reference else reference_scores(model, train, val, REFERENCE, cached)
    for row in rows if ref is not None else []:
        a = agreement(ref, scores[row["product_dtype"]])
        row.update(pearson=round(a["pearson"], 4), spearman=round(a["spearman"], 4))
    table(rows, list(rows[0]), f"{n_params:,}-parameter MLP, {n_train:,} points, "
          f"{args.n_val} validation points, damping 1e-3; one SGD epoch {epoch_s:.3f} s"
          + ("" if ref is None else "; scores against the float32 reference solve"))  # fmt: skip
    if len(rows) == 2:
        wall, cpu = (rows[1][k] / rows[0][k] for k in ("wall_s", "cpu_s"))
        print(f"{n_train:,} points: {rows[1]['product_dtype']} / {rows[0]['product_dtype']} "
              f"time {wall:.2f}x wall, {cpu:.2f}x CPU", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2000)
    parser.add_argument("--n-train", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--n-val", type=int, default=8)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--cache", help="folder that keeps the reference scores")
    parser.add_argument("--no-reference", action="store_true", help="times only, no Pearson")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from lightning_influence.solvers.refinement import fast_bfloat16

    print(f"bfloat16 native on this CPU: {fast_bfloat16(torch.device('cpu'))}", flush=True)
    rows = [row for n_train in args.n_train for row in size(args, n_train)]
    print(json.dumps({"hidden": args.hidden, "n_val": args.n_val, "rows": rows}))


if __name__ == "__main__":
    main()
