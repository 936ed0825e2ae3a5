"""``EKFAC()`` against exact references and kronfluence's EK-FAC on the same models, one thread.

Two cases, each in this one process (ratios from one run):

- digits MLP 64-32-10 tanh (2,410 parameters) at its L2 optimum, 10% of the training labels
  flipped, damping 0.01, 50 validation points: ``peers.py``'s case, against ``Exact()`` in
  float64 (scores, and self-influence with its AUROC for the flipped labels);
- ``synthetic.py``'s ReLU MLP 100-2000-10 (222,010 parameters) trained one SGD epoch on 2,000
  points as ``lissa.py --large`` trains its model, damping 1e-3, 8 validation points, against
  ``lissa.py``'s exact kernel solve in float64 (``Exact()`` would need a 222k x 222k matrix).

Ours (``EKFAC()``, every output-Hessian direction, and ``EKFAC(samples=1)``, one sampled pass)
is timed as the whole ``compute_influence`` call (validation gradients, factors, scoring);
kronfluence as ``fit_all_factors`` plus ``compute_pairwise_scores`` (batch 256 both), with
sampled labels as in ``peers.py``; on digits again over ``--seeds`` label samplings.
kronfluence is skipped, with a note, when it is not installed (``bash benchmarks/setup_peers.sh``
makes ``benchmarks/.venv-peers``).

Usage::

    benchmarks/.venv-peers/bin/python benchmarks/ekfac.py          # both cases
    python benchmarks/ekfac.py --skip-large                        # the digits case only
    python benchmarks/ekfac.py --wide 9000     # only the factors' cost on the 1M-parameter MLP

Prints one markdown table and each run's stages; writes ``benchmarks/results/ekfac.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import traceback
from typing import Any

import torch
from common import Clock, agreement, auroc, setup, table, write_json
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import lightning_influence as li

BATCH = 256


def ours(
    model: nn.Module,
    train: TensorDataset,
    val: TensorDataset,
    damping: float,
    self_influence: bool,
    solver: li.EKFAC | None = None,
) -> dict[str, Any]:
    """``EKFAC()`` (or ``solver``) through ``compute_influence``, sharing its factors with
    self-influence: scores, self-influence, wall and CPU seconds."""
    solver = solver or li.EKFAC()
    clock = Clock()
    result = li.compute_influence(
        model, train, val, solver=solver, damping=damping, batch_size=BATCH,
        self_influence=self_influence, self_influence_solver=solver if self_influence else None,
        progress=False,
    )  # fmt: skip
    wall, cpu = clock.read()
    d = result.diagnostics
    return {
        "scores": result.scores.double(),
        "self_influence": result.self_influence,
        "wall_s": wall,
        "cpu_s": cpu,
        "stages": {
            k: round(float(v), 3) for k, v in d.items() if k.startswith(("time", "solver_time"))
        },
    }


def kronfluence(
    model: nn.Module,
    train: TensorDataset,
    val: TensorDataset,
    damping: float,
    self_influence: bool,
    seed: int = 0,
) -> dict[str, Any]:
    """kronfluence 1.0.1 EK-FAC, as ``peers.py`` calls it, at ``damping``; ``seed`` draws its
    sampled labels."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from peers import _KronTask, _orient

    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    task = _KronTask()
    wrapped = prepare_model(nn.Sequential(copy.deepcopy(model)), task)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(
            analysis_name="ekfac", model=wrapped, task=task, cpu=True, output_dir=tmp,
            disable_tqdm=True, disable_model_save=True,
        )  # fmt: skip
        score_args = ScoreArguments(damping_factor=damping)
        clock = Clock()
        analyzer.fit_all_factors(
            "ekfac", dataset=train, per_device_batch_size=BATCH,
            factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True,
        )  # fmt: skip
        analyzer.compute_pairwise_scores(
            "pair", "ekfac", query_dataset=val, train_dataset=train,
            per_device_query_batch_size=64, per_device_train_batch_size=BATCH,
            score_args=score_args, overwrite_output_dir=True,
        )  # fmt: skip
        pair = analyzer.load_pairwise_scores("pair")["all_modules"]
        out["wall_s"], out["cpu_s"] = clock.read()
        out["scores"] = -_orient(pair, len(train), len(val.tensors[0]))  # their + is helpful
        if self_influence:
            clock = Clock()
            analyzer.compute_self_scores(
                "self", "ekfac", train_dataset=train, per_device_train_batch_size=BATCH,
                score_args=score_args, overwrite_output_dir=True,
            )  # fmt: skip
            out["self_influence"] = analyzer.load_self_scores("self")["all_modules"].double()
            out["time_self_s"] = clock.read()[0]
    return out


def compare(
    case: str,
    model: nn.Module,
    train: TensorDataset,
    val: TensorDataset,
    damping: float,
    ref_scores: Tensor,
    ref_self: Tensor | None = None,
    flipped: Tensor | None = None,
    seeds: int = 1,
) -> list[dict[str, Any]]:
    """Ours and kronfluence's EK-FAC on one model: agreement with the reference, times; with
    ``seeds`` above 1, the range of kronfluence's Pearson over that many label samplings."""
    rows, times = [], {}

    def sampled(*args: Any) -> dict[str, Any]:
        return ours(*args, solver=li.EKFAC(samples=1))

    runners = {
        "ours EKFAC()": ours,
        "kronfluence EK-FAC": kronfluence,
        "ours EKFAC(samples=1)": sampled,
    }
    for name, run in runners.items():
        row: dict[str, Any] = {"case": case, "method": name}
        try:
            out = run(model, train, val, damping, ref_self is not None)
        except Exception as exc:  # a missing or failing peer is recorded, not fatal
            row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            traceback.print_exc()
            rows.append(row)
            continue
        times[name] = out["wall_s"]
        a = agreement(ref_scores, out["scores"])
        row.update(wall_s=round(out["wall_s"], 2), cpu_s=round(out["cpu_s"], 2),
                   pearson=round(a["pearson"], 4), spearman=round(a["spearman"], 4),
                   top10=round(a["top10"], 3), stages=out.get("stages"))  # fmt: skip
        si = out.get("self_influence")
        if ref_self is not None and si is not None:
            row["self_pearson"] = round(agreement(ref_self, si)["pearson"], 4)
            row["self_spearman"] = round(agreement(ref_self, si)["spearman"], 4)
            if flipped is not None and len(flipped):
                row["self_auroc"] = round(auroc(si, flipped, len(si)), 4)
        if name.startswith("kronfluence") and seeds > 1:
            values = [a["pearson"]]
            for seed in range(1, seeds):
                again = kronfluence(model, train, val, damping, False, seed)
                values.append(agreement(ref_scores, again["scores"])["pearson"])
            row["pearson_over_seeds"] = (
                f"{min(values):.4f}-{max(values):.4f}, mean {sum(values) / len(values):.4f}"
            )
        rows.append(row)
    peer = times.get("kronfluence EK-FAC")
    for row in rows:
        if peer and row["method"].startswith("ours") and row["method"] in times:
            row["time_vs_kronfluence"] = round(times[row["method"]] / peer, 3)
    return rows


def digits_case(n_val: int, seeds: int) -> list[dict[str, Any]]:
    from peers import make_case

    c = make_case("mlp", n_val)
    return compare(
        f"digits {c.name}, damping 0.01", c.model, c.train, c.val, 0.01, c.ref_scores,
        c.ref_self.double(), c.flipped, seeds,
    )  # fmt: skip


def large_case(n_train: int, n_val: int, hidden: int) -> list[dict[str, Any]]:
    from lissa import LARGE_DAMPING, kernel_solve, large_scores
    from synthetic import SyntheticClassification, sgd_epoch, stacked, wide_mlp
    from torch.utils.data import DataLoader

    from lightning_influence.core.data import as_indexed
    from lightning_influence.core.model import FunctionalModel
    from lightning_influence.core.scores import example_pass
    from lightning_influence.core.task import ClassificationTask

    model = wide_mlp(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=LARGE_DAMPING)
    loader = DataLoader(SyntheticClassification(n_train, seed=0), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    sgd_epoch(model, loader, opt)
    model.eval()
    train, val = stacked(n_train, seed=0), stacked(n_val, seed=1)
    clock = Clock()
    fm = FunctionalModel(model, ClassificationTask())
    grads = example_pass(fm, as_indexed(val, None, 64), keep_gradients=True).gradients
    assert grads is not None
    solved = kernel_solve(model, train, grads, LARGE_DAMPING)
    ref = large_scores(model, train, solved).double()
    print(f"reference (kernel solve, float64): {clock.read()[0]:.1f} s", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    name = f"ReLU MLP 100-{hidden}-10 ({n_params:,} parameters), {n_train:,} points, damping 1e-3"
    return compare(name, model, train, val, LARGE_DAMPING, ref)


def wide_case(n_train: int, hidden: int) -> dict[str, Any]:
    """The stages of ``EKFAC().factorize`` on ``synthetic.py``'s ``100 -> hidden -> 10`` MLP
    (untrained: a timing only), with every output direction and with one sampled pass."""
    from synthetic import stacked, wide_mlp

    from lightning_influence.core.data import as_indexed
    from lightning_influence.core.model import FunctionalModel
    from lightning_influence.core.task import ClassificationTask

    fm = FunctionalModel(wide_mlp(hidden).eval(), ClassificationTask())
    curvature = li.Curvature(fm, as_indexed(stacked(n_train), None, BATCH))
    out: dict[str, Any] = {"hidden": hidden, "n_params": fm.n_params, "n_train": n_train}
    for samples in (None, 1):
        clock = Clock()
        _, info = li.EKFAC(samples=samples).factorize(curvature, 1e-3)
        wall, cpu = clock.read()
        stages = {k: round(v, 1) for k, v in info.items() if k.startswith("time")}
        row = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), **stages}
        out[f"samples={samples}"] = row
        print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-val", type=int, default=50, help="digits: validation points")
    parser.add_argument("--seeds", type=int, default=6, help="digits: kronfluence samplings")
    parser.add_argument("--skip-large", action="store_true", help="only the digits case")
    parser.add_argument("--n-train", type=int, default=2000, help="large: training points")
    parser.add_argument("--hidden", type=int, default=2000, help="large: hidden width")
    parser.add_argument("--wide", type=int, default=0, help="only time the factors at this width")
    args = parser.parse_args()
    setup(threads=1)
    if args.wide:
        write_json("ekfac_wide", wide_case(args.n_train, args.wide))
        return
    rows = digits_case(args.n_val, args.seeds)
    if not args.skip_large:
        rows += large_case(args.n_train, 8, args.hidden)
    columns = ["case", "method", "wall_s", "cpu_s", "time_vs_kronfluence", "pearson", "spearman",
               "top10", "pearson_over_seeds", "self_pearson", "self_spearman", "self_auroc",
               "note"]  # fmt: skip
    table(rows, columns, "EKFAC() against exact references and kronfluence's EK-FAC, one thread")
    for row in rows:
        if row.get("stages"):
            print(row["case"], row["method"], row["stages"])
    write_json("ekfac", {"rows": rows})


if __name__ == "__main__":
    main()
