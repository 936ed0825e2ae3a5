"""What ``InfluenceCallback`` adds to ``trainer.fit``, in training epochs, for the digits CNN.

The digits CNN (1,898 parameters, 1,200 training images) trains for a few epochs without the
callback, then again (same seed) with it, 64 validation points. The overhead is the callback's
wall time (its ``on_fit_end``, timed by clocks placed before and after it, plus its ``setup``
checks), divided by the median time of one training epoch; the stage breakdown is the result's
``time_*`` diagnostics. In the same run, one epoch of a plain PyTorch loop (the same model,
data, Adam and batch size, no Lightning; best of 3) gives a second ratio, ``influence /
plain epoch``, the result's ``time_total`` over it: the figure the scaling benchmark reported.

Usage::

    python benchmarks/callback_overhead.py                  # defaults + three solvers, last layer
    python benchmarks/callback_overhead.py --configs defaults   # the shipped settings only
    python benchmarks/callback_overhead.py --configs cg-all  # all 1,898 parameters (slow on CPU)

Prints a markdown table; writes ``benchmarks/results/callback_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import lightning as L
from common import RESULTS, digits_cnn_epoch, setup, table, write_json
from lightning.pytorch.callbacks import Callback

from lightning_influence import InfluenceCallback, LiSSA

LAST = ["net.7.*"]  # the linear head: 650 of the 1,898 parameters
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},  # every setting as shipped: LiSSA(), all parameters, self-influence, maps
    "cg-last": {"solver": "cg", "parameters": LAST},
    "exact-last": {"solver": "exact", "parameters": LAST},
    "lissa-last": {"solver": LiSSA(depth=1000, momentum="auto"), "parameters": LAST},
    "cg-all": {"solver": "cg", "parameters": None},
    "exact-all": {"solver": "exact", "parameters": None},
}


class _Clock(Callback):
    """Records when its hooks run (placed before and after the influence callback), in wall time
    and in the process's CPU time (which drifts far less with the load of a shared machine)."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.cpu_at: dict[str, float] = {}
        self.epochs: list[float] = []
        self.cpu_epochs: list[float] = []

    def _mark(self, name: str) -> None:
        self.at[name], self.cpu_at[name] = time.perf_counter(), time.process_time()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._mark("setup")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("epoch")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append(time.perf_counter() - self.at["epoch"])
        self.cpu_epochs.append(time.process_time() - self.cpu_at["epoch"])

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark("fit_end")


def fit(epochs: int, callback: InfluenceCallback | None) -> dict[str, Any]:
    """Train the digits CNN; returns wall times (and the callback's share when it is present)."""
    from digits import DigitsCNN, DigitsDataModule

    L.seed_everything(0, verbose=False)
    before, after = _Clock(), _Clock()
    callbacks: list[Callback] = [before, *([callback] if callback else []), after]
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    started = time.perf_counter()
    trainer.fit(DigitsCNN(), DigitsDataModule())
    out: dict[str, Any] = {
        "fit_s": time.perf_counter() - started,
        "epoch_s": statistics.median(before.epochs),
        "epoch_cpu_s": statistics.median(before.cpu_epochs),
    }
    if callback is not None:
        for key, at_before, at_after in (
            ("callback_s", before.at, after.at),
            ("callback_cpu_s", before.cpu_at, after.cpu_at),
        ):
            out[key] = (at_after["fit_end"] - at_before["fit_end"]) + (
                at_after["setup"] - at_before["setup"]
            )
        assert callback.result is not None
        out["diagnostics"] = callback.result.diagnostics
    return out


def plain_epoch(repeats: int = 3) -> float:
    """Best of ``repeats`` epochs of a plain PyTorch loop over the digits CNN (after 3 warm-up
    epochs): the training step of ``DigitsCNN`` without Lightning around it."""
    from digits import DigitsCNN, DigitsDataModule

    L.seed_everything(0, verbose=False)
    dm, model = DigitsDataModule(), DigitsCNN()
    opt = model.configure_optimizers()
    loader = dm.train_dataloader()
    times = [digits_cnn_epoch(model, loader, opt) for _ in range(3 + repeats)]
    return min(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", nargs="+", default=["defaults", "cg-last", "exact-last", "lissa-last"]
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    setup(threads=args.threads)
    baseline = fit(args.epochs, None)
    baseline["plain_epoch_s"] = plain_epoch()
    rows: list[dict[str, Any]] = []
    for name in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            callback = InfluenceCallback(
                num_val=args.num_val, damping=1e-3, save_dir=tmp, **CONFIGS[name]
            )
            run = fit(args.epochs, callback)
        diag = run["diagnostics"]
        row = {
            "config": name,
            "epoch_s": baseline["epoch_s"],
            "fit_without_s": baseline["fit_s"],
            "fit_with_s": run["fit_s"],
            "callback_s": run["callback_s"],
            "epochs_added": run["callback_s"] / baseline["epoch_s"],
            "epoch_cpu_s": baseline["epoch_cpu_s"],
            "callback_cpu_s": run["callback_cpu_s"],
            "epochs_added_cpu": run["callback_cpu_s"] / baseline["epoch_cpu_s"],
            "plain_epoch_s": baseline["plain_epoch_s"],
            "influence_over_plain_epoch": diag["time_total"] / baseline["plain_epoch_s"],
            **{k: v for k, v in diag.items() if k.startswith("time_")},
            "solver_steps": diag.get("solver_steps"),
        }
        # setup checks, gathering, saving the result and logging it (figures, files); the part
        # after `time_callback_total` is saving and logging
        row["time_other"] = run["callback_s"] - diag["time_total"]
        if "time_callback_total" in diag:
            row["time_save_and_log"] = run["callback_s"] - diag["time_callback_total"]
        rows.append(row)
        print(f"{name}: the callback adds {row['epochs_added']:.1f} training epochs", flush=True)
    stages = [
        "time_val_gradients",
        "time_solver",
        "time_self_influence_factorize",
        "time_scoring",
        "time_perturbation",
        "time_other",
        "time_save_and_log",
    ]
    table(
        rows,
        [
            "config",
            "epoch_s",
            "callback_s",
            "epochs_added",
            "epochs_added_cpu",
            "plain_epoch_s",
            "influence_over_plain_epoch",
            "solver_steps",
            *stages,
        ],
        title=f"InfluenceCallback overhead, digits CNN, {args.num_val} validation points, "
        f"{args.threads} thread(s)",
    )
    # keep the rows of configurations not rerun this time
    previous = RESULTS / "callback_overhead.json"
    if previous.exists():
        rerun = {row["config"] for row in rows}
        old = json.loads(previous.read_text()).get("rows", [])
        rows = [row for row in old if row["config"] not in rerun] + rows
    write_json(
        "callback_overhead",
        {"epochs": args.epochs, "num_val": args.num_val, "baseline": baseline, "rows": rows},
    )


if __name__ == "__main__":
    main()
