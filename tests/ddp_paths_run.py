"""The default paths under data parallelism against one process, above every subsample cap.

Used by ``tests/test_ddp.py``. Trains the digits CNN (666 parameters: above the ``Exact``
self-influence limit, so the default self-influence is a factorization) on 1,100 examples (above
the 1,024 of the LiSSA preconditioner's sample and the 256 of ``LowRank()``'s) with one
``InfluenceCallback`` per solver (``CONFIGS``), each saving to ``<out>/<name>/influence.pt``.
A last callback fails inside a curvature product on the second process only; every process
records the error it raised and how long after the failure in ``<out>/error_rank<r>.txt``.

Launch and compare in one command (``--launch ddp``: two processes; ``--launch nodes``: two
nodes of one process each, started with ``torch.distributed.run`` on this machine)::

    python tests/ddp_paths_run.py --out DIR --launch ddp

prints, per solver, the largest difference from one process relative to the largest value
(``--n-train N`` trains on another number of examples, ``--no-fault`` leaves the failing
callback out).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from digits import DigitsCNN, DigitsDataModule

from lightning_influence import InfluenceCallback, InfluenceError, InfluenceResult, LowRank
from lightning_influence.callback.checkpoint import influence_from_checkpoint
from lightning_influence.core import curvature

N_TRAIN = 1100
COMMON: dict[str, Any] = {"num_val": 8, "damping": 1e-3, "perturbation_k": 0, "seed": 0}
CONFIGS: dict[str, dict[str, Any]] = {
    "lissa": {},  # all defaults: LiSSA, its preconditioner's factorization for self-influence
    # LowRank() self-influence, one output direction (no stored factors)
    "cg": {"solver": "cg", "self_influence_solver": LowRank()},
    # the same factorization serves self-influence; perturbation maps ranked across shards
    "exact": {"solver": "exact", "perturbation_k": 2},
}
# the Hessian: products one batch at a time, whatever the model (no stored factors)
FAULT: dict[str, Any] = {"solver": "cg", "curvature": "hessian", "self_influence": False}
FAULT_DAMPING = 1.0  # H + damping I positive definite, so that only the injected fault stops it
FAILING_PRODUCT = 3  # the second process fails in its third curvature product


def make_data() -> DigitsDataModule:
    """The digits, ``N_TRAIN`` of them for training (``--n-train`` changes it for a launch)."""
    n_train = int(os.environ.get("DDP_PATHS_N_TRAIN", N_TRAIN))
    return DigitsDataModule(batch_size=32, n_train=n_train)


def make_model() -> DigitsCNN:
    return DigitsCNN(channels=4)


class _Faulty(InfluenceCallback):
    """Fails inside a curvature product on the second process; records each process's error."""

    def __init__(self, out: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        original, calls, failed_at = curvature.Curvature.batch_matvec, [0], [time.time()]

        def batch_matvec(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if trainer.global_rank == 1 and calls[0] == FAILING_PRODUCT:
                failed_at[0] = time.time()
                raise torch.OutOfMemoryError("out of memory (a fault injected by the test)")
            return original(self, *args, **kwargs)

        curvature.Curvature.batch_matvec = batch_matvec  # type: ignore[method-assign]
        try:
            super().on_fit_end(trainer, pl_module)
        except InfluenceError as err:
            failed_at = trainer.strategy.broadcast(failed_at, src=1)
            record = {"error": str(err), "seconds": time.time() - failed_at[0]}
            (self.out / f"error_rank{trainer.global_rank}.txt").write_text(json.dumps(record))
            trainer.strategy.barrier("recorded")
            raise
        finally:
            curvature.Curvature.batch_matvec = original  # type: ignore[method-assign]


def train(out: Path, devices: int, num_nodes: int, fault: bool = True) -> None:
    """Fit one epoch with a callback per solver, then the failing one (unless ``fault`` is off)."""
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    callbacks: list[Callback] = [
        InfluenceCallback(save_dir=str(out / name), **{**COMMON, **args})
        for name, args in CONFIGS.items()
    ]
    if fault:
        options = {**COMMON, **FAULT, "damping": FAULT_DAMPING}
        callbacks.append(_Faulty(out, save_dir=str(out / "fault"), **options))
    callbacks.append(ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp",
        max_epochs=1,
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    try:
        trainer.fit(make_model(), make_data())
    except InfluenceError:
        return  # the failing callback's, recorded


def launch(out: Path, how: str, fault: bool = True, timeout: float = 600) -> None:
    """Run :func:`train` as two processes (``"ddp"``) or two nodes of one (``"nodes"``)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    script = [str(Path(__file__).resolve()), "--out", str(out), *([] if fault else ["--no-fault"])]
    if how == "ddp":
        commands = [[sys.executable, *script, "--devices", "2"]]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        torchrun += ["--nproc-per-node", "1", "--master-addr", "127.0.0.1"]
        torchrun += ["--master-port", str(port)]
        commands = [[*torchrun, f"--node-rank={r}", *script, "--nodes", "2"] for r in range(2)]
    procs = [
        subprocess.Popen(c, env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for c in commands
    ]
    outputs = [proc.communicate(timeout=timeout)[0].decode() for proc in procs]
    if not (out / "exact" / "influence.pt").exists():
        raise RuntimeError("\n".join(o[-3000:] for o in outputs))


def compare(out: Path) -> dict[str, dict[str, float]]:
    """Per solver: the DDP result's largest difference from one process (relative to the largest
    value) for scores and self-influence, and the number of processes it ran on."""
    torch.set_num_threads(1)
    figures = {}
    for name, args in CONFIGS.items():
        ddp = InfluenceResult.load(out / name / "influence.pt")
        single = influence_from_checkpoint(
            make_model(),
            make_data(),
            out / "last.ckpt",
            save_dir=str(out / "single" / name),
            trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False},
            **{**COMMON, **args},
        )
        assert torch.equal(ddp.train_indices, single.train_indices)
        assert ddp.self_influence is not None and single.self_influence is not None
        figures[name] = {
            "scores": _relative(ddp.scores, single.scores),
            "self_influence": _relative(ddp.self_influence, single.self_influence),
            "processes": ddp.diagnostics["n_processes"],
        }
    return figures


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--launch", choices=["ddp", "nodes"])
    parser.add_argument("--no-fault", dest="fault", action="store_false")
    parser.add_argument("--n-train", type=int, help=f"training examples ({N_TRAIN})")
    args = parser.parse_args()
    if args.n_train:  # read by every process it starts
        os.environ["DDP_PATHS_N_TRAIN"] = str(args.n_train)
    if args.launch:
        started = time.time()
        launch(args.out, args.launch, args.fault)
        print(f"launch: {time.time() - started:.0f} s")
        for name, row in compare(args.out).items():
            print(name, {k: f"{v:.2g}" for k, v in row.items()})
        for rank in range(2 if args.fault else 0):
            print(f"rank {rank}:", (args.out / f"error_rank{rank}.txt").read_text()[:300])
    else:
        train(args.out, args.devices, args.nodes, args.fault)
