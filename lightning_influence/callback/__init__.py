"""The Lightning side: the callback's hooks, finding the data, checkpoints, data parallelism."""

from lightning_influence.callback.callback import (
    InfluenceCallback,
    InfluenceError,
    influence_from_checkpoint,
)

__all__ = ["InfluenceCallback", "InfluenceError", "influence_from_checkpoint"]
