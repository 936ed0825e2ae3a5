"""Side by side with the peers: same model, same data, same damping, scores against the exact ones.

scikit-learn digits (standardised, 1,200 training points, 10% of the training labels flipped at
random), a multinomial logistic regression and a 64-32-10 tanh MLP, each fitted to its optimum
with L2 = 0.01 (L-BFGS); damping = 0.01 everywhere (translated into each peer's convention);
``--n-val`` validation points (50 by default). For each method: wall time of the pairwise scores,
Pearson / Spearman / top-10 overlap against our ``Exact`` float64 scores (Gauss-Newton curvature,
the package default; equal to the Hessian for logistic regression), and, where the method offers a
factorized inverse, the wall time of self-influence for all 1,200 training points and its AUROC
for finding the flipped labels.

Run in the peers' environment (``bash benchmarks/setup_peers.sh`` makes it)::

    benchmarks/.venv-peers/bin/python benchmarks/peers.py

A peer that is missing or fails is recorded with its error and skipped. Peers return pairwise
scores with the opposite sign to ours (their positive = helpful); they are negated here.
Prints markdown tables and the time ratio of each comparable pair; writes
``benchmarks/results/peers.json``.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    WEIGHT_DECAY,
    Clock,
    agreement,
    auroc,
    fitted_digits,
    float32,
    setup,
    table,
    write_json,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li

DAMPING = WEIGHT_DECAY


@dataclass
class Case:
    """One model at its optimum with float32 copies of it and of the data."""

    name: str
    kind: str  # "logreg" or "mlp"
    model: nn.Module  # float32
    train: TensorDataset  # float32
    val: TensorDataset  # float32, the first n_val points
    flipped: Tensor
    ref_scores: Tensor  # [n_train, n_val], ours Exact float64, positive = harmful
    ref_self: Tensor  # [n_train]


@dataclass
class Outcome:
    """What one method produced (scores in our sign convention)."""

    scores: Tensor | None
    time_pairwise: float
    cpu_pairwise: float
    self_influence: Tensor | None = None
    time_self: float | None = None
    note: str = ""


def make_case(kind: str, n_val: int) -> Case:
    model, train, val = fitted_digits(kind, flip_fraction=0.1)
    val = TensorDataset(*[t[:n_val] for t in val.tensors])
    ref = li.compute_influence(
        model, train, val, solver=li.Exact(), damping=DAMPING, progress=False,
        self_influence_solver=li.Exact(),  # the default would be LowRank above 512 parameters
    )  # fmt: skip
    model32, train32, val32 = float32(model, train, val)
    name = {"logreg": "logistic regression", "mlp": "MLP 64-32-10 tanh"}[kind]
    assert ref.self_influence is not None
    flipped = train.flipped  # type: ignore[attr-defined]
    return Case(name, kind, model32, train32, val32, flipped, ref.scores, ref.self_influence)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    clock = Clock()
    out = fn()
    return (out, *clock.read())


def _orient(scores: Tensor, n_train: int, n_val: int) -> Tensor:
    """Peers return ``[n_val, n_train]`` or ``[n_train, n_val]``; give ``[n_train, n_val]``."""
    scores = scores.detach().double().cpu()
    if scores.shape == (n_val, n_train) and n_val != n_train:
        scores = scores.T
    if scores.shape != (n_train, n_val):
        raise ValueError(f"unexpected score shape {tuple(scores.shape)}")
    return scores


# ----------------------------------------------------------------------------------------- ours
def ours(solver: li.Solver, factorized: li.Solver | None = None) -> Callable[[Case], Outcome]:
    def run(case: Case) -> Outcome:
        res, t, cpu = _timed(
            lambda: li.compute_influence(
                case.model, case.train, case.val, solver=solver, damping=DAMPING,
                self_influence=False, progress=False,
            )
        )  # fmt: skip
        out = Outcome(res.scores.double(), t, cpu, note=_diag(res.diagnostics))
        if factorized is not None:
            one = TensorDataset(*[x[:1] for x in case.val.tensors])
            res_self, t_self, _ = _timed(
                lambda: li.compute_influence(
                    case.model, case.train, one, solver=factorized, damping=DAMPING,
                    self_influence_solver=factorized, progress=False,
                )
            )  # fmt: skip
            out.self_influence, out.time_self = res_self.self_influence, t_self
        return out

    return run


def _diag(d: dict[str, float]) -> str:
    """Where our solver's time went: its share of the run and what it did."""
    keep = {
        "time_solver": "solver wall s",
        "solver_scale": "scale",
        "solver_steps": "steps",
        "solver_residual_checks": "checks",
        "solver_final_batch_size": "batch",
        "solver_relative_residual": "residual",
        "solver_preconditioner_rank": "precond. rank",
        "solver_preconditioner_matvecs": "precond. products",
        "solver_preconditioned_condition_number": "kappa",
        "solver_rank": "rank",
    }
    return ", ".join(f"{v}={d[k]:.4g}" for k, v in keep.items() if k in d)


# ---------------------------------------------------------------------------------------- peers
def _loaders(case: Case, batch_size: int = 128) -> tuple[DataLoader[Any], DataLoader[Any]]:
    return (
        DataLoader(case.train, batch_size=batch_size, shuffle=False),
        DataLoader(case.val, batch_size=batch_size, shuffle=False),
    )


# pyDVL's LiSSA at the fewest iterations that keep the accuracy of its defaults (maxiter 1000,
# scale 10), from `--pydvl-lissa-sweep` (maxiter 250-1000, scale 3-10, batches of 128). Without
# iterate averaging its minibatch noise sets the accuracy: on the MLP it plateaus by 250 steps
# (more steps or another scale do not help); on logistic regression it needs its 1,000 steps.
PYDVL_LISSA_FAIR = {
    "logreg": {"maxiter": 1000, "scale": 10.0},
    "mlp": {"maxiter": 250, "scale": 3.0},
}


def pydvl(kind: str, fair: bool = False) -> Callable[[Case], Outcome]:
    """pyDVL 0.10: ``regularization`` is our damping (added to the mean-loss curvature).

    ``fair``: LiSSA with ``PYDVL_LISSA_FAIR``'s settings for the model instead of its defaults.
    """

    def run(case: Case, **lissa: Any) -> Outcome:
        from pydvl.influence.torch import (
            ArnoldiInfluence,
            CgInfluence,
            EkfacInfluence,
            LissaInfluence,
        )
        from pydvl.influence.types import InfluenceMode

        loss = nn.functional.cross_entropy
        gn = _pydvl_gn()
        model = case.model
        if kind == "lissa":  # library defaults: maxiter 1000, scale 10, rtol 1e-4
            lissa = lissa or (PYDVL_LISSA_FAIR[case.kind] if fair else {})
            inf: Any = LissaInfluence(
                model, loss, regularization=DAMPING, warn_on_max_iteration=False, **lissa, **gn
            )
        elif kind == "cg":
            inf = CgInfluence(
                model, loss, regularization=DAMPING, solve_simultaneously=True,
                warn_on_max_iteration=False, **gn,
            )  # fmt: skip
        elif kind == "arnoldi":  # rank 50 as Captum's default projection dimension
            inf = ArnoldiInfluence(model, loss, regularization=DAMPING, rank=50, **gn)
        else:
            inf = EkfacInfluence(model, update_diagonal=True, hessian_regularization=DAMPING)
        train_loader, _ = _loaders(case)
        xt, yt = case.train.tensors
        xv, yv = case.val.tensors
        clock = Clock()
        inf = inf.fit(train_loader)
        pair = inf.influences(xv, yv, xt, yt, mode=InfluenceMode.Up)
        out = Outcome(-_orient(pair, len(xt), len(xv)), *clock.read())
        if kind in ("arnoldi", "ekfac"):  # factorized: self-influence is affordable
            start = time.perf_counter()
            factors = inf.influence_factors(xt, yt)
            grads = _pydvl_grads(inf, xt, yt)
            out.self_influence = (factors * grads).sum(1).detach()
            out.time_self = time.perf_counter() - start
        return out

    return run


def _pydvl_gn() -> dict[str, Any]:
    try:
        from pydvl.influence.torch.base import SecondOrderMode  # type: ignore[attr-defined]
    except ImportError:
        try:
            from pydvl.influence.types import SecondOrderMode
        except ImportError:
            return {}
    return {"second_order_mode": SecondOrderMode.GAUSS_NEWTON}


def _pydvl_grads(inf: Any, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample training gradients, flattened in the parameter order pyDVL uses."""
    from torch.func import functional_call, grad, vmap

    model = inf.model
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[k].reshape(len(x), -1) for k in params], dim=1)


def captum_arnoldi(case: Case) -> Outcome:
    """Captum 0.9 ``ArnoldiInfluenceFunction`` at its defaults (projection dimension 50).

    Captum takes the Hessian of the summed loss, so its ``hessian_reg`` is ``n * damping``.
    """
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

    n = len(case.train)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "model.pt")
        torch.save(case.model.state_dict(), ckpt)

        def load(model: nn.Module, path: str) -> float:
            model.load_state_dict(torch.load(path, weights_only=True))
            return 1.0

        xv, yv = case.val.tensors
        clock = Clock()
        inf = ArnoldiInfluenceFunction(
            case.model, case.train, ckpt, checkpoints_load_func=load,
            loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=128,
            hessian_reg=n * DAMPING,
        )  # fmt: skip
        pair = inf.influence((xv, yv))
        out = Outcome(-_orient(pair, n, len(xv)), *clock.read())
        start = time.perf_counter()
        out.self_influence = inf.self_influence(DataLoader(case.train, batch_size=128)).detach()
        out.time_self = time.perf_counter() - start
    return out


class _KronTask:
    """kronfluence task: summed cross-entropy; sampled labels for the Fisher (its default)."""

    def __new__(cls) -> Any:
        from kronfluence.task import Task

        class KronTask(Task):
            def compute_train_loss(
                self, batch: Any, model: nn.Module, sample: bool = False
            ) -> Tensor:
                x, y = batch
                logits = model(x)
                if not sample:
                    return nn.functional.cross_entropy(logits, y, reduction="sum")
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), -1)
                    y = torch.multinomial(probs, 1).flatten()
                return nn.functional.cross_entropy(logits, y, reduction="sum")

            def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
                x, y = batch
                return nn.functional.cross_entropy(model(x), y, reduction="sum")

        return KronTask()


def kronfluence_ekfac(case: Case) -> Outcome:
    """kronfluence 1.0.1 EK-FAC; ``damping_factor`` is our damping (mean-loss curvature)."""
    import copy
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    torch.manual_seed(0)
    task = _KronTask()
    # a bare nn.Linear as the root module sends prepare_model into endless recursion
    model = prepare_model(nn.Sequential(copy.deepcopy(case.model)), task)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(
            analysis_name="digits", model=model, task=task, cpu=True, output_dir=tmp,
            disable_tqdm=True, disable_model_save=True,
        )  # fmt: skip
        factor_args = FactorArguments(strategy="ekfac")
        score_args = ScoreArguments(damping_factor=DAMPING)
        clock = Clock()
        analyzer.fit_all_factors(
            "ekfac", dataset=case.train, per_device_batch_size=128, factor_args=factor_args,
            overwrite_output_dir=True,
        )  # fmt: skip
        analyzer.compute_pairwise_scores(
            "pair", "ekfac", query_dataset=case.val, train_dataset=case.train,
            per_device_query_batch_size=64, per_device_train_batch_size=128,
            score_args=score_args, overwrite_output_dir=True,
        )  # fmt: skip
        pair = analyzer.load_pairwise_scores("pair")["all_modules"]
        out = Outcome(-_orient(pair, len(case.train), len(case.val)), *clock.read())
        start = time.perf_counter()
        analyzer.compute_self_scores(
            "self", "ekfac", train_dataset=case.train, per_device_train_batch_size=128,
            score_args=score_args, overwrite_output_dir=True,
        )  # fmt: skip
        out.self_influence = analyzer.load_self_scores("self")["all_modules"].detach()
        out.time_self = time.perf_counter() - start
    return out


def dattri_lissa(case: Case) -> Outcome:
    """dattri 0.3 LiSSA at its defaults (batch 1, depth 5000, scaling 50). Its recursion is
    ``v + (1 - d) h - Hh / s``, so ``damping = our damping / scaling`` gives the same system."""
    from dattri.algorithm.influence_function import IFAttributorLiSSA
    from dattri.task import AttributionTask
    from torch.func import functional_call

    model = case.model

    def loss_func(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data  # one example (vmapped) or a batch, depending on the caller
        x = x.reshape(-1, x.shape[-1])
        logits = functional_call(model, params, (x,))
        return nn.functional.cross_entropy(logits, y.reshape(-1).long())

    scaling = 50.0
    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    attributor = IFAttributorLiSSA(task=task, damping=DAMPING / scaling, scaling=scaling)
    _, val_loader = _loaders(case)
    # one training batch: dattri recomputes the validation IHVPs for every training batch
    full = DataLoader(case.train, batch_size=len(case.train))
    clock = Clock()
    attributor.cache(full)
    pair = attributor.attribute(full, val_loader)
    scores = -_orient(pair, len(case.train), len(case.val))
    return Outcome(scores, *clock.read(), note="self-influence skipped")


# ------------------------------------------------------------------------------------ the table
def methods() -> list[tuple[str, str, Callable[[Case], Outcome]]]:
    """(family, name, runner) for every method benchmarked."""
    low_rank = getattr(li, "LowRank", None)
    if low_rank is None:
        try:
            from lightning_influence.solvers.lowrank import LowRank as low_rank
        except ImportError:
            low_rank = None
    rows: list[tuple[str, str, Callable[[Case], Outcome]]] = [
        ("lissa", "ours LiSSA", ours(li.LiSSA())),  # the default: preconditioned
        ("lissa", "ours LiSSA plain", ours(li.LiSSA(preconditioner=None))),
        ("cg", "ours CG", ours(li.CG())),
        ("exact", "ours Exact", ours(li.Exact(), li.Exact())),
    ]
    if low_rank is not None:
        rows.append(("factorized", "ours LowRank", ours(low_rank(), low_rank())))
    rows += [
        ("lissa", "pyDVL LiSSA", pydvl("lissa")),
        ("lissa", "pyDVL LiSSA fair", pydvl("lissa", fair=True)),
        ("lissa", "dattri LiSSA", dattri_lissa),
        ("cg", "pyDVL CG", pydvl("cg")),
        ("factorized", "Captum Arnoldi", captum_arnoldi),
        ("factorized", "pyDVL Arnoldi", pydvl("arnoldi")),
        ("factorized", "kronfluence EK-FAC", kronfluence_ekfac),
        ("factorized", "pyDVL EK-FAC", pydvl("ekfac")),
    ]
    return rows


PAIRS = [
    ("ours LiSSA", "pyDVL LiSSA"),
    ("ours LiSSA", "pyDVL LiSSA fair"),
    ("ours LiSSA plain", "pyDVL LiSSA"),
    ("ours LiSSA", "dattri LiSSA"),
    ("ours CG", "pyDVL CG"),
    ("ours LowRank", "Captum Arnoldi"),
    ("ours LowRank", "pyDVL Arnoldi"),
    ("ours LowRank", "kronfluence EK-FAC"),
    ("ours LowRank", "pyDVL EK-FAC"),
    ("ours Exact", "Captum Arnoldi"),
    ("ours Exact", "pyDVL Arnoldi"),
    ("ours Exact", "kronfluence EK-FAC"),
    ("ours Exact", "pyDVL EK-FAC"),
]


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "captum", "kronfluence", "pydvl", "dattri", "lightning_influence"):
        try:
            mod = importlib.import_module(name)
            out[name] = str(getattr(mod, "__version__", "installed"))
        except Exception as exc:  # a missing peer is a result, not a crash
            out[name] = f"not importable: {type(exc).__name__}: {exc}"
    return out


def evaluate(case: Case, only: list[str] | None, repeat: int = 1) -> list[dict[str, Any]]:
    rows = []
    for family, name, run in methods():
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        row: dict[str, Any] = {"model": case.name, "method": name, "family": family}
        try:
            outs = []
            for _ in range(repeat):  # the same seed each time: the same scores
                torch.manual_seed(0)
                outs.append(run(case))
            out = min(outs, key=lambda o: o.cpu_pairwise)  # the best run, its note with it
            assert out.scores is not None
            row.update(agreement(case.ref_scores, out.scores))
            row["time_s"] = min(o.time_pairwise for o in outs)
            row["cpu_s"] = out.cpu_pairwise
            if out.self_influence is not None:
                si = out.self_influence.double().reshape(-1)
                row["self_spearman"] = agreement(case.ref_self, si)["spearman"]
                row["auroc"] = auroc(si, case.flipped, len(case.train))
                row["self_time_s"] = out.time_self
            row["note"] = out.note
        except Exception as exc:  # record and move on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            row["traceback"] = traceback.format_exc()[-2000:]
        rows.append(row)
        print(f"  {case.name:22s} {name:20s} " + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in row.items() if k not in ("model", "method", "family", "traceback")
        ), flush=True)  # fmt: skip
    ref_auroc = auroc(case.ref_self, case.flipped, len(case.train))
    rows.append({"model": case.name, "method": "reference (Exact float64)", "auroc": ref_auroc})
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Time ratio (peer / ours: above 1 means ours is faster) and accuracy gap per pair."""
    out = []
    by = {(r["model"], r["method"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for a, b in PAIRS:
            ra, rb = by.get((model, a)), by.get((model, b))
            if not ra or not rb or "time_s" not in ra or "time_s" not in rb:
                continue
            row = {
                "model": model,
                "ours": a,
                "peer": b,
                "time_ratio": rb["time_s"] / ra["time_s"],
                "d_pearson": ra["pearson"] - rb["pearson"],
                "d_spearman": ra["spearman"] - rb["spearman"],
            }
            if "self_time_s" in ra and "self_time_s" in rb:
                row["self_time_ratio"] = rb["self_time_s"] / ra["self_time_s"]
                row["d_auroc"] = ra["auroc"] - rb["auroc"]
            out.append(row)
    return out


def lissa_target(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our default LiSSA beside each peer's LiSSA: time ratio ours / peer (wall and CPU) and the
    accuracy of both; ``target``: ours at least as accurate on all three measures and
    ``ours / pyDVL LiSSA <= 1/3`` in CPU time."""
    by = {(r["model"], r["method"]): r for r in rows}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ours_row = by.get((model, "ours LiSSA"))
        if not ours_row or "time_s" not in ours_row:
            continue
        peer_rows = [r for r in rows if r["model"] == model and r.get("family") == "lissa"]
        for peer in peer_rows:
            if peer["method"].startswith("ours") or "time_s" not in peer:
                continue
            accurate = all(ours_row[k] >= peer[k] for k in ("pearson", "spearman", "top10"))
            cpu_ratio = ours_row["cpu_s"] / peer["cpu_s"]
            out.append({
                "model": model,
                "peer": peer["method"],
                "ours / peer (wall)": ours_row["time_s"] / peer["time_s"],
                "ours / peer (CPU)": cpu_ratio,
                "ours Pearson": ours_row["pearson"],
                "peer Pearson": peer["pearson"],
                "ours Spearman": ours_row["spearman"],
                "peer Spearman": peer["spearman"],
                "ours top-10": ours_row["top10"],
                "peer top-10": peer["top10"],
                "target": ("met" if accurate and cpu_ratio <= 1 / 3 else "missed")
                if peer["method"].startswith("pyDVL LiSSA") else "-",
            })  # fmt: skip
    return out


def pydvl_lissa_sweep(case: Case, repeat: int) -> list[dict[str, Any]]:
    """pyDVL's LiSSA over ``maxiter`` and ``scale``: what its accuracy costs."""
    rows, run = [], pydvl("lissa")
    for scale in (10.0, 5.0, 3.0):
        for maxiter in (250, 500, 1000):
            name = f"pyDVL LiSSA scale={scale:g} maxiter={maxiter}"
            row: dict[str, Any] = {"model": case.name, "method": name, "family": "sweep"}
            cpus = []
            for _ in range(repeat):
                torch.manual_seed(0)
                out = run(case, maxiter=maxiter, scale=scale)  # type: ignore[call-arg]
                cpus.append(out.cpu_pairwise)
            assert out.scores is not None
            row.update(agreement(case.ref_scores, out.scores), cpu_s=min(cpus))
            print(f"  {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                            if isinstance(v, float)), flush=True)  # fmt: skip
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Accuracy and speed against peers")
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--models", nargs="+", default=["logreg", "mlp"])
    parser.add_argument("--only", nargs="*", help="substrings of method names to run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method, best time kept")
    parser.add_argument("--pydvl-lissa-sweep", action="store_true",
                        help="only pyDVL's LiSSA over maxiter and scale")  # fmt: skip
    args = parser.parse_args()
    setup(threads=1)
    vers = versions()
    print("versions:", vers)
    if args.pydvl_lissa_sweep:
        rows = [r for kind in args.models
                for r in pydvl_lissa_sweep(make_case(kind, args.n_val), args.repeat)]  # fmt: skip
        table(rows, ["model", "method", "cpu_s", "pearson", "spearman", "top10"], "pyDVL LiSSA")
        write_json("peers_pydvl_lissa", {"n_val": args.n_val, "damping": DAMPING, "rows": rows})
        return
    rows: list[dict[str, Any]] = []
    for kind in args.models:
        case = make_case(kind, args.n_val)
        rows += evaluate(case, args.only, args.repeat)
    cols = ["model", "method", "time_s", "cpu_s", "pearson", "spearman", "top10", "self_time_s",
            "self_spearman", "auroc", "note", "error"]  # fmt: skip
    table(rows, cols, f"Against exact scores, {args.n_val} validation points, damping {DAMPING}")
    pair_rows = ratios(rows)
    table(
        pair_rows,
        [
            "model",
            "ours",
            "peer",
            "time_ratio",
            "d_pearson",
            "d_spearman",
            "self_time_ratio",
            "d_auroc",
        ],
        "Ratios per comparable pair (time_ratio = peer time / our time; d_* = ours - peer)",
    )
    target_rows = lissa_target(rows)
    if target_rows:
        table(
            target_rows,
            list(target_rows[0]),
            "LiSSA against the peers' LiSSA (ours / peer: below 1 means ours is faster; "
            "target: at least as accurate in at most 1/3 of pyDVL LiSSA's CPU time)",
        )
    write_json("peers", {"n_val": args.n_val, "damping": DAMPING, "repeat": args.repeat,
                         "versions": vers, "rows": rows, "pairs": pair_rows,
                         "lissa_target": target_rows})  # fmt: skip


if __name__ == "__main__":
    main()
