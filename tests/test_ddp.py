"""InfluenceCallback under DDP (two CPU processes, gloo) against one process, and result merging.

Curvature under DDP is the mean over every process's shard, the same matrix as on one process, so
the scores of a DDP run must equal those computed on one process from the same final weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_influence_run import CALLBACK_ARGS, N_TRAIN, make_data, make_model, train
from torch.utils.data import TensorDataset

from lightning_influence import Exact, InfluenceResult, compute_influence, influence_from_checkpoint
from lightning_influence.callback.distributed import shard_indices, strategy_reduce
from lightning_influence.result import ROW_FIELDS

SCRIPT = Path(__file__).with_name("ddp_influence_run.py")
REL_TOL = 1e-4


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _check_against_single_process(out: Path) -> None:
    """The DDP result file against the same callback run on one process from the final weights."""
    ddp = InfluenceResult.load(out / "influence.pt")
    single = influence_from_checkpoint(
        make_model(),
        make_data(),
        out / "last.ckpt",
        save_dir=str(out / "single"),
        trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False},
        **CALLBACK_ARGS,
    )
    data = make_data()
    assert ddp.diagnostics["n_processes"] == 2.0
    assert torch.equal(ddp.train_indices, torch.arange(N_TRAIN))  # every example once, in order
    assert torch.equal(ddp.val_indices, single.val_indices)
    assert ddp.train_targets is not None
    assert torch.equal(ddp.train_targets, data.train_dataset.tensors[1])
    assert ddp.scores.shape == (N_TRAIN, CALLBACK_ARGS["num_val"])
    assert _relative_error(ddp.scores, single.scores) < REL_TOL
    assert ddp.self_influence is not None and single.self_influence is not None
    assert _relative_error(ddp.self_influence, single.self_influence) < REL_TOL
    assert torch.equal(ddp.helpful(5).indices, single.helpful(5).indices)
    assert torch.equal(ddp.harmful(5).indices, single.harmful(5).indices)
    assert torch.equal(ddp.outliers(10).indices, single.outliers(10).indices)
    # Perturbation maps: each process ranked its own shard; the merged top-k is the global one.
    assert ddp.perturbation is not None and single.perturbation is not None
    assert torch.equal(ddp.perturbation_indices, single.perturbation_indices)
    assert _relative_error(ddp.perturbation, single.perturbation) < REL_TOL


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_subprocess_matches_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--strategy", "ddp"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    _check_against_single_process(tmp_path)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_spawn_matches_one_process(tmp_path: Path) -> None:
    callback = train(tmp_path, "ddp_spawn", devices=2)
    assert callback.result is None  # computed in the worker processes; it travels through the file
    _check_against_single_process(tmp_path)


def test_shards_are_disjoint_and_cover_all() -> None:
    shards = [shard_indices(torch.arange(11), rank, 3) for rank in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(11))
    assert [len(s) for s in shards] == [4, 4, 3]
    assert strategy_reduce(None, world_size=1) is None
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        shard_indices(torch.arange(4), rank=2, world_size=2)


def test_merged_shards_with_padding_duplicates_equal_one_pass() -> None:
    """Shards as a padding DistributedSampler makes them (an index repeated) merge to one pass."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(25, 4, generator=gen, dtype=torch.float64), torch.arange(25) % 3
    train, val = TensorDataset(x[:21], y[:21]), TensorDataset(x[21:], y[21:])
    model = torch.nn.Linear(4, 3).double()
    common = {"solver": Exact(), "damping": 0.1, "progress": False}
    full = compute_influence(model, train, val, **common)
    # Curvature of the whole set in both shards (no reduce here), scores of each shard's rows.
    shards = [torch.arange(0, 21, 2), torch.cat([torch.arange(1, 21, 2), torch.tensor([0])])]
    parts = []
    for shard in shards:
        part = compute_influence(model, train, val, **common)
        keep = torch.isin(part.train_indices, shard)
        rows = {name: getattr(part, name)[keep] for name in ROW_FIELDS}
        parts.append(InfluenceResult(**{**part.__dict__, **rows}))
    merged = InfluenceResult.merge(parts)
    assert torch.equal(merged.train_indices, torch.arange(21))
    torch.testing.assert_close(merged.scores, full.scores, rtol=1e-10, atol=0)
    torch.testing.assert_close(merged.self_influence, full.self_influence, rtol=1e-10, atol=0)
