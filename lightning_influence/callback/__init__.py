"""The Lightning side: the callback's hooks, finding the data, checkpoints, data parallelism."""

from lightning_influence.callback.callback import InfluenceCallback
from lightning_influence.callback.checkpoint import influence_from_checkpoint
from lightning_influence.errors import InfluenceError

__all__ = ["InfluenceCallback", "InfluenceError", "influence_from_checkpoint"]
