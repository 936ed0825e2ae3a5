"""InfluenceCallback under DDP (two CPU processes, gloo; two nodes of one) against one process,
and result merging.

Curvature under DDP is the mean over every process's shard, the same matrix as on one process,
and every subsample is drawn by dataset index, so the scores of a DDP run must equal those
computed on one process from the same final weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import ddp_paths_run
import pytest
import torch
from ddp_influence_run import CALLBACK_ARGS, N_TRAIN, make_data, make_model, train
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_influence import (
    Exact,
    InfluenceResult,
    LiSSA,
    compute_influence,
    influence_from_checkpoint,
)
from lightning_influence.callback.distributed import shard_indices, strategy_reduce
from lightning_influence.result import ROW_FIELDS

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
    assert ddp.scores.shape == (N_TRAIN, CALLBACK_ARGS["num_val"])
    assert _relative_error(ddp.scores, single.scores) < REL_TOL
    assert ddp.self_influence is not None and single.self_influence is not None
    assert _relative_error(ddp.self_influence, single.self_influence) < REL_TOL
    _same_rows_and_maps(ddp, single, make_data().train_dataset.tensors[1])


def _same_rows_and_maps(ddp: InfluenceResult, single: InfluenceResult, targets: Tensor) -> None:
    """Every example once, in order, with its target; the same rankings and perturbation maps
    (each process ranked its own shard: the merged top-k is the global one)."""
    assert ddp.diagnostics["n_processes"] == 2.0
    assert torch.equal(ddp.train_indices, torch.arange(len(targets)))
    assert torch.equal(ddp.val_indices, single.val_indices)
    assert ddp.train_targets is not None
    assert torch.equal(ddp.train_targets, targets)
    assert torch.equal(ddp.helpful(5).indices, single.helpful(5).indices)
    assert torch.equal(ddp.harmful(5).indices, single.harmful(5).indices)
    assert torch.equal(ddp.outliers(10).indices, single.outliers(10).indices)
    assert ddp.perturbation is not None and single.perturbation is not None
    assert torch.equal(ddp.perturbation_indices, single.perturbation_indices)
    assert _relative_error(ddp.perturbation, single.perturbation) < REL_TOL


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_spawn_matches_one_process(tmp_path: Path) -> None:
    callback = train(tmp_path, "ddp_spawn", devices=2)
    assert callback.result is None  # computed in the worker processes; it travels through the file
    _check_against_single_process(tmp_path)


def _check_default_paths(out: Path) -> None:
    """Every default path of a ``ddp_paths_run`` launch against one process, above every
    subsample cap; then its failing callback: the same error on every process, at once."""
    figures = ddp_paths_run.compare(out)
    tolerance = {"lissa": LiSSA().tol, "cg": 1e-4, "exact": 1e-6}  # LiSSA's on the scores
    for name, row in figures.items():
        assert row["processes"] == 2.0
        assert row["scores"] < tolerance[name], (name, row)
        assert row["self_influence"] < 1e-4, (name, row)  # the same factorization
    capped = {"lissa": "solver_preconditioner_examples", "cg": "self_influence_examples"}
    for name, key in capped.items():
        sample = InfluenceResult.load(out / name / "influence.pt").diagnostics[key]
        assert sample < ddp_paths_run.N_TRAIN, (name, sample)  # a subsample, the same one
    # every example once, in order; rankings and perturbation maps merged across shards
    ddp, single = (InfluenceResult.load(out / d / "exact" / "influence.pt") for d in ("", "single"))
    _same_rows_and_maps(ddp, single, ddp_paths_run.make_data().train_dataset.tensors[1])
    records = [json.loads((out / f"error_rank{r}.txt").read_text()) for r in range(2)]
    assert records[0]["error"] == records[1]["error"], records
    assert "process [0]: CollectiveFailure: 1 other process failed" in records[0]["error"]
    assert "process [1]: InfluenceError: InfluenceCallback ran out of memory" in records[0]["error"]
    assert max(r["seconds"] for r in records) < 10


@pytest.mark.slow
@pytest.mark.ddp
def test_two_processes_equal_one_on_every_default_path(tmp_path: Path) -> None:
    ddp_paths_run.launch(tmp_path, "ddp", timeout=300)
    _check_default_paths(tmp_path)


@pytest.mark.slow
@pytest.mark.ddp
def test_two_nodes_equal_one_on_every_default_path(tmp_path: Path) -> None:
    ddp_paths_run.launch(tmp_path, "nodes", timeout=300)
    _check_default_paths(tmp_path)


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
