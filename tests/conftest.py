"""Reproducible, quiet test runs: one intra-op thread, fixed seeds, W&B confined to tmp_path."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # `from models import ...` in tests
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))  # `from digits import ...`

# One intra-op thread: on a 2-core machine timings and even results of reductions vary otherwise.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:  # pragma: no cover
        pass
    wandb_dir = tmp_path / "wandb"
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(wandb_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
