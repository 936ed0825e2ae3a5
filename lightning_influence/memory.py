"""How much memory influence will need, estimated before any work starts.

A model too large for the chosen path should fail at once with a message that says what to
change, not grow to the memory limit after training and die in the allocator.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_influence.core.probe import KEEP_BYTES
from lightning_influence.solvers import Exact, LiSSA, LowRank, Solver
from lightning_influence.solvers.lowrank import size_limit
from lightning_influence.solvers.sketch import bytes_per_vector

__all__ = ["available_bytes", "estimate_bytes", "format_bytes"]

# [m, p] blocks an iterative solver holds at once (iterates, averages, products in flight)
_SOLVER_BLOCKS = 8
# per-sample gradients of one batch, and the vmap intermediates beside them
_GRADIENT_BLOCKS = 3


def estimate_bytes(
    n_params: int,
    n_val: int,
    batch_size: int,
    element_size: int,
    solvers: list[Solver],
) -> dict[str, int]:
    """Peak bytes of each stage: validation gradients and solve, training gradients, a dense
    ``p x p`` matrix for each :class:`Exact` solver, and the sketch of a :class:`LowRank`
    factorization (``LiSSA``'s preconditioner included) beside the validation gradients.

    Example:
        >>> est = estimate_bytes(1000, 10, 32, 4, [Exact()])
        >>> est["dense curvature (Exact)"], est["training gradients"]
        (12000000, 384000)
        >>> big = estimate_bytes(10**6, 8, 32, 4, [LowRank(max_memory=2**30)])
        >>> big["low-rank factorization (LowRank's max_memory)"] <= 2**30 + 8 * 4 * 10**6
        True
    """
    p, m = n_params, n_val
    out = {
        "validation gradients and solve": _SOLVER_BLOCKS * m * p * element_size,
        "training gradients": _GRADIENT_BLOCKS * batch_size * p * element_size,
    }
    if any(isinstance(s, Exact) for s in solvers):
        out["dense curvature (Exact)"] = 3 * p * p * element_size
    probes = [s.probe_examples for s in solvers if isinstance(s, LiSSA) and s.preconditioner]
    if probes:  # the probe's gradients, kept where they fit in 64 MiB
        out["validation gradients and solve"] += min(KEEP_BYTES, max(probes) * p * element_size)
    sketch = max((_sketch_vectors(s, p, element_size) for s in solvers), default=0)
    if sketch:
        name = "low-rank factorization (LowRank's max_memory)"
        out[name] = sketch * bytes_per_vector(p, element_size) + m * p * element_size
        # the kept half stays beside the solve's blocks
        out["validation gradients and solve"] += sketch // 2 * p * element_size
    return out


def _sketch_vectors(solver: Solver, p: int, element_size: int) -> int:
    """The most vectors the low-rank sketch of ``solver`` (or of its preconditioner) takes."""
    lowrank = solver.preconditioner if isinstance(solver, LiSSA) else solver
    if not isinstance(lowrank, LowRank):
        return 0
    if lowrank.rank != "auto":
        return min(p, lowrank.rank + lowrank.oversample)
    budget = max(2, lowrank.max_memory // bytes_per_vector(p, element_size))
    return min(p, size_limit(p), budget)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (``MemAvailable`` on a Linux CPU); ``None`` when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``.

    Example:
        >>> format_bytes(3 * 2**30)
        '3.0 GiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover
