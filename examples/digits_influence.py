"""Train a small CNN on scikit-learn's digits with 10% flipped labels and ``InfluenceCallback``.

When training ends the callback computes, for 64 validation digits, which training digits helped
and which harmed them, and the self-influence of every training digit (flipped labels rank high).
The explanations printed are relative (each score over the square root of the training digit's
self-influence): raw scores let the flipped labels lead every digit's list. Everything lands in
TensorBoard under ``runs/``; the script prints where and how to open it.

    python examples/digits_influence.py            # about 30 s on one CPU thread
    python examples/digits_influence.py --epochs 3 --quiet
    python -m tensorboard.main --logdir runs       # then look under the influence/ tags
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import DigitsCNN, DigitsDataModule

from lightning_influence import InfluenceCallback, InfluenceResult


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    parser.add_argument("--num-val", type=int, default=64, help="validation digits to explain")
    parser.add_argument("--flip-fraction", type=float, default=0.1, help="training labels flipped")
    parser.add_argument(
        "--solver",
        choices=["lissa", "cg", "exact"],
        default="lissa",
        help="lissa (default, preconditioned: any model size); exact, cg: small models",
    )
    parser.add_argument(
        "--parameters",
        nargs="+",
        default=None,
        help="parameter name patterns to use (default: all 1,898; 'net.7.*' takes the last "
        "layer's 650: about 3 s less on one CPU thread, and finds fewer flipped labels)",
    )
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="TensorBoard root folder")
    parser.add_argument("--name", default="digits_influence", help="experiment name in --runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, short summary")
    return parser.parse_args(argv)


class Run(NamedTuple):
    """What :func:`train` leaves: the trained model, its data, the influence result, the seconds
    training and influence took, and the TensorBoard log folder."""

    model: DigitsCNN
    data: DigitsDataModule
    result: InfluenceResult
    seconds: float
    log_dir: Path


def main(argv: list[str] | None = None) -> InfluenceResult:
    args = parse_args(argv)
    run = train(args)
    report(run.result, run.data, args, run.seconds, run.log_dir)
    return run.result


def train(args: argparse.Namespace) -> Run:
    """Train the CNN with ``InfluenceCallback`` as ``args`` say (also used by the benchmarks)."""
    torch.set_num_threads(args.threads)
    if args.quiet:  # Lightning's info lines and warnings too
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore")
    L.seed_everything(args.seed, verbose=not args.quiet)
    data = DigitsDataModule(flip_fraction=args.flip_fraction, seed=args.seed)
    model = DigitsCNN(weight_decay=1e-3)
    influence = InfluenceCallback(
        num_val=args.num_val,
        solver=args.solver,
        parameters=args.parameters,
        damping=model.hparams.weight_decay,  # the model's own L2: its objective's curvature
        seed=args.seed,
    )
    logger = TensorBoardLogger(args.runs, name=args.name)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[influence],
        enable_checkpointing=False,
        enable_model_summary=not args.quiet,
        enable_progress_bar=not args.quiet,
        log_every_n_steps=5,
    )
    started = time.perf_counter()
    trainer.fit(model, data)
    assert influence.result is not None
    return Run(model, data, influence.result, time.perf_counter() - started, Path(logger.log_dir))


def report(
    result: InfluenceResult,
    data: DigitsDataModule,
    args: argparse.Namespace,
    seconds: float,
    log_dir: Path,
) -> None:
    """Print the top helpful and harmful examples (relative, and the raw helpful ones), the
    outliers, and where everything is."""
    train_targets = data.train_dataset.tensors[1]
    flipped = set(data.flipped.tolist())
    clean = data.clean_train_targets

    def label(i: int) -> str:
        mark = f" (flipped from {int(clean[i])})" if i in flipped else ""
        return f"#{i} label {int(train_targets[i])}{mark}"

    print(f"\nTrained {args.epochs} epochs and computed influence in {seconds:.1f} s.")
    shown = 1 if args.quiet else 3
    # Relative influence where self-influence is known: a digit's own helpful and harmful
    # examples, not the flipped labels that move the model most and so lead every raw list.
    relative = result.self_influence is not None
    helpful, harmful = result.helpful(3, relative=relative), result.harmful(3, relative=relative)
    raw_helpful = result.helpful(3)
    if relative:
        print(
            "\nExplained by relative influence (score / sqrt(self-influence)): the training "
            "digits most\nspecific to each validation digit. The raw ranking favours digits "
            "with large gradients,\nsuch as flipped labels, which then lead every list."
        )
    for j in range(min(shown, result.val_indices.numel())):
        v = int(result.val_indices[j])
        target = int(data.val_dataset.tensors[1][v])
        print(f"\nValidation digit #{v} (label {target}):")
        print("  most helpful:", ", ".join(label(int(i)) for i in helpful.indices[j]))
        print("  most harmful:", ", ".join(label(int(i)) for i in harmful.indices[j]))
        if relative:
            print("  raw, most helpful:", ", ".join(label(int(i)) for i in raw_helpful.indices[j]))
    if result.self_influence is not None and flipped:
        n_check = max(1, len(flipped))
        top = result.outliers(n_check).indices.tolist()
        found = len(flipped.intersection(top))
        print(
            f"\nHighest self-influence: {found} of the top {n_check} training digits are among "
            f"the {len(flipped)} flipped labels ({found / n_check:.0%}; "
            f"{len(flipped) / len(clean):.0%} by chance)."
        )
        print("  top 5:", "; ".join(label(i) for i in top[:5]))
    print(f"\nTensorBoard logs:  {log_dir.resolve()}")
    print(f"Influence files:   {(log_dir / 'influence').resolve()}")
    # the interpreter that ran this script has tensorboard, wherever its `bin/` is on the PATH
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(Path(args.runs).resolve())]
    print(f"Open them with:    {shlex.join(command)}")


if __name__ == "__main__":
    main()
