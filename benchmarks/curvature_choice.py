"""Gauss-Newton or Hessian for validation scores, judged by leave-one-out retraining.

The two label-noise cases of ``self_influence.py`` (digits, 10% flipped labels; (a) random flips,
64-32-10 MLP at its weight-decay optimum; (b) confusable flips, 64-64-10 MLP fitted to every
label). For each case and each curvature, ``Exact`` validation scores on 50 validation points;
then, for the worst-fit validation point, the predicted effect of removing a training example
(``result.removal_effect``) against the change of its loss after actually retraining without the
example (L-BFGS from the optimum, same objective): 16 examples with the largest predicted effect
under each curvature and 16 at random. Also the agreement of the two curvatures' scores.

    python benchmarks/curvature_choice.py            # both cases, about 20 minutes on one core
    python benchmarks/curvature_choice.py --case a
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import refit_without
from self_influence import CASES, ROOT, fitted_case

from lightning_influence import Exact, compute_influence

N_VAL = 50
PER_GROUP = 16


def run_case(name: str) -> dict[str, Any]:
    cfg = CASES[name]
    model, train, val, _ = fitted_case(name)
    (x, y), (xv, yv) = train.tensors, val.tensors
    results = {}
    for kind in ("gauss_newton", "hessian"):
        results[kind] = compute_influence(
            model, train, val, solver=Exact(), damping=cfg["damping"], curvature=kind,
            val_indices=range(N_VAL), self_influence=False, perturbation_k=0, batch_size=256,
            progress=False,
        )  # fmt: skip
    gn, hess = (results[k].scores for k in ("gauss_newton", "hessian"))
    j = int(results["gauss_newton"].val_losses.argmax())  # the worst fit: the largest effects
    chosen: list[int] = []
    for result in results.values():  # the largest predicted effects under each curvature
        ranked = result.removal_effect[:, j].abs().argsort(descending=True).tolist()
        chosen += [i for i in ranked if i not in chosen][:PER_GROUP]
    generator = torch.Generator().manual_seed(0)
    rest = [i for i in torch.randperm(len(y), generator=generator).tolist() if i not in chosen]
    chosen += rest[:PER_GROUP]

    def val_loss(m: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(m(xv[j : j + 1]), yv[j : j + 1]))

    base = val_loss(model)
    actual = torch.tensor(
        [val_loss(refit_without(model, x, y, i, cfg["weight_decay"], 300)) - base for i in chosen]
    )
    row: dict[str, Any] = {
        "case": name,
        "val_point": j,
        "retrainings": len(chosen),
        "scores_pearson_gn_vs_hessian": float(pearsonr(gn.flatten(), hess.flatten())[0]),
        "scores_spearman_gn_vs_hessian": float(spearmanr(gn.flatten(), hess.flatten())[0]),
    }
    print(
        f"\n## Case ({name}): {cfg['mode']} flips, damping {cfg['damping']:g}, weight decay "
        f"{cfg['weight_decay']:g}; validation point {j}, {len(chosen)} retrainings\n"
        f"scores on {N_VAL} validation points, Gauss-Newton vs Hessian: Pearson "
        f"{row['scores_pearson_gn_vs_hessian']:.4f}, Spearman "
        f"{row['scores_spearman_gn_vs_hessian']:.4f}\n"
        "| curvature | Pearson vs retraining | Spearman vs retraining |\n|---|---|---|",
        flush=True,
    )
    for kind, result in results.items():
        predicted = result.removal_effect[chosen, j]
        pearson = float(pearsonr(predicted, actual)[0])
        spearman = float(spearmanr(predicted, actual)[0])
        row[f"{kind}_pearson_vs_retraining"] = pearson
        row[f"{kind}_spearman_vs_retraining"] = spearman
        print(f"| {kind.replace('_', '-')} | {pearson:.4f} | {spearman:.4f} |", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["a", "b", "both"], default="both")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [run_case(c) for c in (["a", "b"] if args.case == "both" else [args.case])]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"curvature_choice_{args.case}.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
