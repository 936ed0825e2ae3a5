"""``influence_from_checkpoint``: the callback's work on an already trained model, once.

It runs :class:`~lightning_influence.InfluenceCallback` through ``trainer.validate`` with the
checkpoint's weights, so the same data, settings, DDP and loggers apply, without retraining.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from lightning_influence.callback.callback import InfluenceCallback
from lightning_influence.callback.checks import fresh_out_dir
from lightning_influence.errors import InfluenceError
from lightning_influence.result import InfluenceResult

__all__ = ["influence_from_checkpoint"]


def influence_from_checkpoint(
    model: L.LightningModule,
    datamodule: L.LightningDataModule | None = None,
    ckpt_path: str | Path | None = None,
    *,
    trainer_kwargs: Mapping[str, Any] | None = None,
    **callback_args: Any,
) -> InfluenceResult:
    """Influence for an already trained model, without retraining: the callback's work, once.

    Runs :class:`InfluenceCallback` (with ``callback_args``) through ``trainer.validate(model,
    datamodule, ckpt_path=ckpt_path)``, so the weights come from the checkpoint, the same data,
    settings, DDP and loggers apply, and the result equals what the callback gave at the end of
    fit. Without a datamodule, pass ``train_dataset=`` and ``val_dataset=``.

    Args:
        model: the LightningModule (its weights are replaced by the checkpoint's when given).
        datamodule: the data the model was trained on.
        ckpt_path: a checkpoint written by Lightning; ``None`` uses the model as it is.
        trainer_kwargs: ``Trainer`` arguments (devices, strategy, logger, default_root_dir, where
            ``<log_dir>/influence/`` is saved). One device, no logger by default.
        **callback_args: :class:`InfluenceCallback` arguments.

    Returns:
        The :class:`~lightning_influence.InfluenceResult`, also saved as the callback saves it.

    Example:
        >>> import torch, lightning as L, tempfile
        >>> from torch.utils.data import TensorDataset
        >>> class Tiny(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(3, 2)
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def validation_step(self, batch, batch_idx):
        ...         pass
        >>> data = TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
        >>> result = influence_from_checkpoint(
        ...     Tiny(), train_dataset=data, val_dataset=data, solver="exact", damping=0.1,
        ...     perturbation_k=0, save_dir=tempfile.mkdtemp(),
        ...     trainer_kwargs={"enable_progress_bar": False})
        >>> result.scores.shape
        torch.Size([20, 20])
    """
    callback = InfluenceCallback(**{**callback_args, "run_on": "validate"})
    kwargs: dict[str, Any] = {
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        **(trainer_kwargs or {}),
    }
    kwargs["callbacks"] = [*kwargs.get("callbacks", []), callback]
    trainer = L.Trainer(**kwargs)
    loaders = None
    if datamodule is None and callback.val_dataset is not None:
        loaders = DataLoader(callback.val_dataset, batch_size=callback.config.batch_size or 64)
    # where the run will save (a folder already holding a result is never reused)
    path = fresh_out_dir(callback.out_dir(trainer), callback.filename) / callback.filename
    trainer.validate(model, loaders, ckpt_path=ckpt_path, datamodule=datamodule, verbose=False)
    if callback.result is not None:
        return callback.result
    # ddp_spawn: computed in the worker processes, which saved it
    if not path.exists():  # pragma: no cover
        raise InfluenceError(f"The validate run finished without an influence result at {path}.")
    return InfluenceResult.load(path)
