"""InfluenceCallback under DDP (two CPU processes, gloo; two nodes of one) against one process,
and result merging.

Curvature under DDP is the mean over every process's shard, the same matrix as on one process,
and every subsample is drawn by dataset index, so the scores of a DDP run must equal those
computed on one process from the same final weights.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ddp_paths_run
import pytest
import torch
from ddp_influence_run import CALLBACK_ARGS, N_TRAIN, make_data, make_model, train
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_influence import (
    Exact,
    InfluenceResult,
    LiSSA,
    compute_influence,
    influence_from_checkpoint,
)
from lightning_influence.callback.distributed import shard_indices, strategy_reduce
from lightning_influence.core.collective import CollectiveFailure
from lightning_influence.core.curvature import Curvature
from lightning_influence.core.data import as_indexed
from lightning_influence.core.model import FunctionalModel
from lightning_influence.core.task import ClassificationTask
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


class _Threads:
    """Two "processes" as threads: ``reduce(rank)`` sums a tensor over them (a stand-in for the
    all-reduce, for fast checks of what each process draws). ``torch.func``'s forward-mode
    levels are global, not per thread, so one thread computes at a time: it holds ``turn``
    while it works and hands it over while it waits in ``reduce``."""

    def __init__(self, world: int = 2) -> None:
        self.world, self.barrier = world, threading.Barrier(world, timeout=20)
        self.slots: list[Tensor | None] = [None] * world
        self.turn = threading.Lock()

    def reduce(self, rank: int) -> Callable[[Tensor], Tensor]:
        def reduce(tensor: Tensor) -> Tensor:
            self.slots[rank] = tensor.clone()
            self.turn.release()
            try:
                self.barrier.wait()
                total = sum(s for s in self.slots if s is not None)
                self.barrier.wait()  # everyone has read before the next sum writes
            finally:
                self.turn.acquire()
            assert isinstance(total, Tensor)
            return total

        return reduce

    def run(self, work: Callable[[int, Callable[[Tensor], Tensor]], Any]) -> list[Any]:
        """``work(rank, reduce)`` on every rank at once: its results, or the errors it raised."""
        results: list[Any] = [None] * self.world

        def target(rank: int) -> None:
            with self.turn:
                try:
                    results[rank] = work(rank, self.reduce(rank))
                except Exception as err:
                    results[rank] = err

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        return results


def _small_problem(conv: bool) -> tuple[FunctionalModel, TensorDataset]:
    """A dense model (products pass over the data) or a small CNN (per-example factors kept)."""
    gen = torch.Generator().manual_seed(0)
    if conv:
        torch.manual_seed(0)
        model: nn.Module = nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
        )
        x = torch.randn(50, 1, 6, 6, generator=gen, dtype=torch.float64)
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(50, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=gen)
    return FunctionalModel(model.double(), ClassificationTask()), TensorDataset(x, y)


@pytest.mark.parametrize("conv", [False, True], ids=["products", "factors"])
def test_two_shards_draw_the_same_subsample_and_minibatches_as_one(conv: bool) -> None:
    fm, dataset = _small_problem(conv)
    data = as_indexed(dataset, batch_size=16)
    v = torch.randn(2, fm.n_params, generator=torch.Generator().manual_seed(1), dtype=fm.dtype)

    def products(rank: int, reduce: Callable[[Tensor], Tensor] | None) -> Tensor:
        shard = data if reduce is None else data.subset(shard_indices(data.indices, rank, 2))
        curvature = Curvature(fm, shard, reduce=reduce)
        gen = torch.Generator().manual_seed(3)
        sub = curvature.subsample(20, None, gen)
        assert sub.n_total == 20  # in all, whatever the number of processes
        batches = [curvature.minibatch(12, gen)(v) for _ in range(3)]
        return torch.stack([sub.matvec(v), sub.dense()[:2], *batches])

    one = products(0, None)
    assert (Curvature(fm, data).factors() is not None) == conv
    for result in _Threads().run(products):
        assert isinstance(result, Tensor), result
        torch.testing.assert_close(result, one, rtol=1e-10, atol=1e-12)


def test_a_failure_inside_a_product_stops_every_process() -> None:
    fm, dataset = _small_problem(conv=False)
    data = as_indexed(dataset, batch_size=16)
    v = torch.ones(1, fm.n_params, dtype=fm.dtype)

    def work(rank: int, reduce: Callable[[Tensor], Tensor]) -> Tensor:
        curvature = Curvature(fm, data.subset(shard_indices(data.indices, rank, 2)), reduce=reduce)
        if rank == 1:

            def fail(*args: Any, **kwargs: Any) -> Tensor:
                raise torch.OutOfMemoryError("out of memory in a product")

            curvature.batch_matvec = fail  # type: ignore[method-assign]
        return curvature.matvec(v)

    results = _Threads().run(work)  # no thread waits for the other: the barrier would time out
    assert isinstance(results[0], CollectiveFailure), results
    assert "1 other process failed while computing a curvature product" in str(results[0])
    assert isinstance(results[1], torch.OutOfMemoryError), results
