"""``InfluenceError``: influence failed after training, and what to change.

:func:`explained_failures` turns a solver divergence or an out-of-memory error into one, naming
the settings to change; the finished training run (checkpoints, logs) is never touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lightning_influence.config import InfluenceConfig
from lightning_influence.solvers import SolverDivergedError

__all__ = ["INTACT", "InfluenceError", "explained_failures"]

INTACT = "Training finished and its checkpoints and logs are intact; only influence failed."


class InfluenceError(RuntimeError):
    """Influence could not be computed after training; the training run itself is intact."""


@contextmanager
def explained_failures(config: InfluenceConfig) -> Iterator[None]:
    """Re-raise a solver divergence or an out-of-memory error as an :class:`InfluenceError`.

    Example:
        >>> with explained_failures(InfluenceConfig(batch_size=16)):  # doctest: +ELLIPSIS
        ...     raise MemoryError("no room")
        Traceback (most recent call last):
        ...
        lightning_influence.errors.InfluenceError: InfluenceCallback ran out of memory: no room ...
    """
    try:
        yield
    except SolverDivergedError as err:
        raise InfluenceError(
            f"InfluenceCallback: the {config.make_solver().name} solver diverged: {err} {INTACT} "
            f"Change `damping` (it is {config.damping:g}), the LiSSA `scale`, or use "
            "solver='cg' or 'exact'."
        ) from err
    except (torch.OutOfMemoryError, MemoryError) as err:
        raise InfluenceError(
            f"InfluenceCallback ran out of memory: {err} {INTACT} Lower `batch_size` (it is "
            f"{config.batch_size}), `num_val` (it is {config.num_val}), or select fewer "
            "parameters with `parameters=` (e.g. the last layer); with `self_influence=True` the "
            "default Exact self-influence solver needs a p x p matrix."
        ) from err
