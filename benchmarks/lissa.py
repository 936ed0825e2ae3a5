"""Preconditioned LiSSA at its defaults against ``Exact()`` and ``CG()`` on the same curvature.

Prints, per model and damping: Pearson / Spearman of the scores against ``Exact()``, wall time,
the ratio to ``Exact()``'s time measured in the same run, and LiSSA's steps, preconditioner rank
and preconditioned condition number (result diagnostics). One intra-op thread.

    python benchmarks/lissa.py            # the digits MLP at damping 1e-2, 1e-3, 1e-4 and with
                                          # the Hessian at its optimum
    python benchmarks/lissa.py --cnn      # also the digits CNN of the examples at damping 1e-3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from common import agreement, fitted_digits, float32

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
                     f"{d['solver_preconditioned_condition_number']:.3g}, final minibatch "
                     f"{d['solver_final_batch_size']:.0f}")  # fmt: skip
        print(f"  {solver.name:6s} pearson {a['pearson']:.4f} spearman {a['spearman']:.4f} "
              f"{wall:7.2f} s = {wall / exact_s:.2f}x exact, steps {d.get('solver_steps', 0):.0f}"
              f"{extra}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cnn", action="store_true", help="also the digits CNN at damping 1e-3")
    args = parser.parse_args()
    torch.set_num_threads(1)
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


if __name__ == "__main__":
    main()
