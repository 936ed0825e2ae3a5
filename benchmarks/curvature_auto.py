"""``curvature="auto"`` against ``"gauss_newton"`` (the default) and ``"hessian"``: which curvature
it picks, what each costs, and how well each follows leave-one-out retraining.

Two digits MLPs (64-32-10 tanh), scored in float32 at the callback's defaults (``LiSSA()``, 64
validation points, self-influence, no perturbation maps), damping 0.01:

- ``optimum``: the tests' model at its L2 optimum (L-BFGS, weight decay 0.01);
- ``sgd``: the same network after a few epochs of SGD (lr 0.1, batches of 32, weight decay 0.01),
  not at an optimum; also at damping 1e-3, the package default.

Times are this process's CPU seconds, the best of ``--repeats`` runs, the three curvatures
interleaved, ratios against Gauss-Newton in the same run (``check_s`` and ``solver_s``, from the
result's diagnostics, are wall seconds). For the optimum, each of ``2 * --per-group`` training
examples (the largest predicted removal effects on the worst-fit validation point under either
curvature, and as many at random) is removed and the model refitted (L-BFGS from the optimum,
same objective); the Pearson correlation of predicted and actual changes of that point's loss
(as in ``tests/test_accuracy.py``) and over all 64 points is printed, for each curvature's
``LiSSA()`` scores and for float64 ``Exact()`` ones. The spectrum at the bottom of
``H + damping I`` (explicit, float64) says why the Hessian solve is slower, and how much a
preconditioner that also deflated the bottom eigenvectors could gain.

    python benchmarks/curvature_auto.py            # about 5 minutes on one core
    python benchmarks/curvature_auto.py --per-group 8 --repeats 1
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings
from typing import Any

import torch
from common import fitted_digits, float32, pearson, setup, table, write_json
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_influence import Curvature, Exact, InfluenceResult, compute_influence
from lightning_influence.core.data import as_indexed
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.task import ClassificationTask

WEIGHT_DECAY = 0.01
KINDS = ("gauss_newton", "hessian", "auto")
LANCZOS = 40  # the check's steps


def sgd_model(train: TensorDataset, epochs: int, seed: int = 0) -> nn.Module:
    """The digits MLP after ``epochs`` of SGD with weight decay, float32."""
    from models import mlp  # tests/models.py

    torch.manual_seed(seed)
    model = mlp().float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=WEIGHT_DECAY)
    x, y = train.tensors
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 32):
            batch = order[start : start + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    return model


def run(model: nn.Module, train: Any, val: Any, kind: str, damping: float) -> Any:
    """One default run with ``curvature=kind``: (result or error message, CPU seconds of this
    process, which a machine shared with other jobs disturbs far less than wall time)."""
    start = time.process_time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result: Any = compute_influence(
                model, train, val, curvature=kind, damping=damping, num_val=64, progress=False
            )
    except ValueError as err:  # the Hessian where H + damping I is indefinite
        result = str(err).split(":")[0]
    return result, time.process_time() - start


def timings(
    model: nn.Module, train: Any, val: Any, damping: float, repeats: int
) -> dict[str, tuple[Any, float]]:
    """The best time of each curvature over ``repeats`` interleaved rounds, and its result."""
    best: dict[str, tuple[Any, float]] = {}
    for _ in range(repeats):
        for kind in KINDS:
            result, seconds = run(model, train, val, kind, damping)
            if kind not in best or seconds < best[kind][1]:
                best[kind] = (result, seconds)
    return best


def rows_for(case: str, damping: float, best: dict[str, tuple[Any, float]]) -> list[dict]:
    base = best["gauss_newton"][1]
    rows = []
    for kind, (result, seconds) in best.items():
        row: dict[str, Any] = {"model": case, "damping": damping, "curvature": kind}
        row["cpu_s"], row["x_gauss_newton"] = seconds, seconds / base
        if isinstance(result, InfluenceResult):
            d = result.diagnostics
            row["used"] = result.settings["curvature_used"]
            row["smallest_eigenvalue"] = d.get("curvature_smallest_eigenvalue")
            row["check_products"] = d.get("curvature_check_products")
            row["check_s"] = d.get("time_curvature_choice")
            row["solver_s"] = d["time_solver"]
            row["steps"] = d.get("solver_steps")
            row["precond_rank"] = d.get("solver_preconditioner_rank")
        else:
            row["used"] = f"fails: {result}"
        rows.append(row)
    return rows


def bottom_spectrum(
    model: nn.Module, train: TensorDataset, damping: float, rank: int
) -> dict[str, float]:
    """The explicit spectrum of ``H + damping I`` (float64) near zero, and the condition number
    of the system a preconditioner of the top ``rank`` eigenpairs leaves, ``(l_rank + damping) /
    smallest``: as it is, and if the bottom ``LANCZOS`` eigenvectors were deflated too (exact
    ones: the best that reusing the check's Lanczos vectors could do). Steps go as its root."""
    fm = FunctionalModel(copy.deepcopy(model).double(), ClassificationTask())
    data = TensorDataset(train.tensors[0].double(), train.tensors[1])
    hessian = Curvature(fm, as_indexed(data, batch_size=1024), "hessian").dense()
    shifted = torch.linalg.eigvalsh(hessian) + damping
    return {
        "smallest_of_H": float(shifted[0]) - damping,
        "smallest_of_H_plus_damping": float(shifted[0]),
        "below_half_damping": float((shifted < damping / 2).sum()),
        "below_damping": float((shifted < damping).sum()),
        "largest": float(shifted[-1]),
        "condition": float(shifted[-rank - 1] / shifted[0]) if shifted[0] > 0 else math.nan,
        "condition_bottom_deflated": (
            float(shifted[-rank - 1] / shifted[LANCZOS]) if shifted[0] > 0 else math.nan
        ),
    }


def leave_one_out(
    model: nn.Module,
    train: TensorDataset,
    val: TensorDataset,
    results: dict[str, InfluenceResult],
    per_group: int,
) -> dict[str, dict[str, float]]:
    """Pearson of predicted and retrained changes of the validation losses, for each result."""
    from models import refit_without  # tests/models.py

    x, y = train.tensors
    first = next(iter(results.values()))
    val_rows = first.val_indices
    xv, yv = val.tensors[0][val_rows], val.tensors[1][val_rows]
    j = int(first.val_losses.argmax())  # the worst fit: the largest effects
    chosen: list[int] = []
    for kind in ("gauss_newton", "hessian"):
        ranked = results[kind].removal_effect[:, j].abs().argsort(descending=True).tolist()
        chosen += [i for i in ranked if i not in chosen][:per_group]
    generator = torch.Generator().manual_seed(0)
    rest = [i for i in torch.randperm(len(y), generator=generator).tolist() if i not in chosen]
    chosen += rest[:per_group]

    def val_losses(m: nn.Module) -> Tensor:
        with torch.no_grad():
            return nn.functional.cross_entropy(m(xv), yv, reduction="none")

    base = val_losses(model)
    actual = torch.stack(
        [val_losses(refit_without(model, x, y, i, WEIGHT_DECAY)) - base for i in chosen]
    )
    out = {}
    for name, result in results.items():
        predicted = result.removal_effect[chosen].double()
        out[name] = {
            "worst_point": pearson(predicted[:, j], actual[:, j]),
            "all_points": pearson(predicted.flatten(), actual.flatten()),
        }
    return {"retrainings": {"count": float(len(chosen)), "val_point": float(j)}, **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-group", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="SGD epochs of the sgd model")
    args = parser.parse_args()
    setup(1)
    model64, train64, val64 = fitted_digits("mlp", WEIGHT_DECAY)
    model, train, val = float32(model64, train64, val64)
    sgd = sgd_model(train, args.epochs)
    rows: list[dict] = []
    optimum = timings(model, train, val, WEIGHT_DECAY, args.repeats)
    rows += rows_for("optimum", WEIGHT_DECAY, optimum)
    for damping in (WEIGHT_DECAY, 1e-3):
        sgd_best = timings(sgd, train, val, damping, args.repeats)
        rows += rows_for(f"sgd {args.epochs} epochs", damping, sgd_best)
    columns = ["model", "damping", "curvature", "used", "smallest_eigenvalue", "check_products",
               "cpu_s", "x_gauss_newton", "check_s", "solver_s", "steps",
               "precond_rank"]  # fmt: skip
    table(rows, columns, "Which curvature, and its time (float32, LiSSA(), 64 validation points)")
    rank = int(optimum["hessian"][0].diagnostics["solver_preconditioner_rank"])
    spectra = {
        "optimum": bottom_spectrum(model64, train64, WEIGHT_DECAY, rank),
        "sgd": bottom_spectrum(sgd, train, WEIGHT_DECAY, rank),
    }
    table([{"model": k, **v} for k, v in spectra.items()],
          ["model", *spectra["optimum"]], "Bottom of H + 0.01 I, explicit (float64)")  # fmt: skip

    used = {kind: optimum[kind][0] for kind in KINDS}
    exact = {
        f"exact {kind}": compute_influence(
            model64, train64, val64, solver=Exact(), curvature=kind, damping=WEIGHT_DECAY,
            val_indices=used["gauss_newton"].val_indices, self_influence=False, progress=False,
        )
        for kind in ("gauss_newton", "hessian")
    }  # fmt: skip
    loo = leave_one_out(model64, train64, val64, {**used, **exact}, args.per_group)
    meta = loo.pop("retrainings")
    table([{"scores": k, **v} for k, v in loo.items()], ["scores", "worst_point", "all_points"],
          f"Leave-one-out at the optimum: Pearson, predicted vs retrained, {meta['count']:.0f} "
          f"retrainings (validation point {meta['val_point']:.0f}; all 64 points)")  # fmt: skip
    write_json("curvature_auto", {"rows": rows, "spectra": spectra, "leave_one_out": loo, **meta})


if __name__ == "__main__":
    main()
