"""A cheap CPU ``Trainer`` for the callback tests: one epoch, no logger, checkpoints or bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


def quick_trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> L.Trainer:
    """A one-epoch CPU ``Trainer`` writing under ``tmp_path``; ``kwargs`` override the options."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "default_root_dir": tmp_path,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": False,
        "callbacks": callbacks,
        **kwargs,
    }
    return L.Trainer(**options)
