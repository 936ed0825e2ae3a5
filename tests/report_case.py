"""The influence result the report tests share, and readers of what the loggers really wrote:
TensorBoard event files, markdown tables, W&B offline run logs."""

from __future__ import annotations

import functools
import glob
import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from digits import DigitsCNN, DigitsDataModule
from text_influence import TOPICS, TextClassifier, TextDataModule
from torch.utils.data import TensorDataset

from lightning_influence import ClassificationTask, Exact, InfluenceResult, compute_influence
from lightning_influence.report import LogSettings, log_influence

N_VAL, TOP_K, N_OUT = 3, 4, 12
SETTINGS = LogSettings(n_val=N_VAL, top_k=TOP_K, n_outliers=N_OUT)
HELPFUL_RGB = (34, 140, 34)  # the frame colours of report/drawing.py, as 8-bit RGB
HARMFUL_RGB = (214, 38, 41)


def fit(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float
) -> torch.nn.Module:
    """``model`` trained with Adam on cross-entropy, without a Trainer, then in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(batch):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class Case:
    """A data module (``dm``), the exact influence (damping 0.01) of a model trained on it, and
    the settings to show it."""

    def __init__(self, dm: Any, model: torch.nn.Module, settings: LogSettings, **options: Any):
        self.dm, self.settings = dm, settings
        train, val = dm.train_dataset, dm.val_dataset
        options.update(solver=Exact(), damping=1e-2, progress=False)
        self.result = compute_influence(model, train, val, **options)

    def log(self, loggers: list[Any], out: Path, **kwargs: Any) -> list[Path]:
        """``log_influence`` of the result (``settings=`` replaces the case's settings)."""
        settings = kwargs.pop("settings", self.settings)
        train, val = self.dm.train_dataset, self.dm.val_dataset
        return log_influence(
            self.result, loggers, train, val, ClassificationTask(), out, settings, **kwargs
        )


class Digits(Case):
    """A real influence result on digits: a tiny CNN trained briefly, 300 x 16 examples."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        dm = DigitsDataModule(n_train=400, flip_fraction=0.1)
        model = fit(DigitsCNN(channels=2), *dm.train_dataset.tensors, 30, 100, 3e-2)
        super().__init__(
            dm,
            model,
            SETTINGS,
            train_indices=torch.arange(50, 350),  # dataset indices != row positions
            val_indices=torch.arange(10, 26),
            perturbation_k=TOP_K,
        )


@functools.cache
def digits_case() -> Digits:
    """Computed once per session and shared with the browser tests (nothing mutates it)."""
    torch.set_num_threads(1)
    return Digits()


class Text(Case):
    """A real influence result on generated sentences: the text example's model, trained briefly
    without a Trainer, 200 training x 12 validation sentences, shown as decoded text."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        dm = TextDataModule(n_train=200, n_val=12, seed=0)
        model = fit(TextClassifier(len(dm.train.vocab)), *dm.train_dataset.tensors, 15, 50, 0.05)
        names = tuple(TOPICS)
        shown = LogSettings(n_val=2, top_k=3, n_outliers=5, kind="text", class_names=names)
        super().__init__(dm, model, replace(shown, describe=dm.train.decode), perturbation_k=0)


class Table(Case):
    """Rows of four named features (a linear model, 80 rows): examples shown as tables."""

    names = ("age", "income", "height", "weight")

    def __init__(self) -> None:
        torch.manual_seed(0)
        x = torch.randn(80, 4)
        y = (x[:, 0] + x[:, 1] > 0).long()
        data = TensorDataset(x, y)
        dm = SimpleNamespace(train_dataset=data, val_dataset=data)
        model = fit(torch.nn.Linear(4, 2), x, y, 20, 20, 0.1)
        shown = LogSettings(n_val=2, top_k=3, n_outliers=5, kind="table", feature_names=self.names)
        super().__init__(dm, model, shown, val_indices=torch.arange(8, 20))


@functools.cache
def table_case() -> Table:
    """Computed once per session (nothing mutates it)."""
    torch.set_num_threads(1)
    return Table()


@functools.cache
def text_case() -> Text:
    """Computed once per session (nothing mutates it)."""
    torch.set_num_threads(1)
    return Text()


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------


def table_rows(markdown: str) -> list[list[str]]:
    """Body rows of the markdown table(s) in ``markdown``, as lists of stripped cells."""
    rows = []
    for line in markdown.splitlines():
        if line.startswith("|") and not line.startswith("| ---") and "---:" not in line:
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return [r for r in rows if r[0] not in ("kind", "rank", "diagnostic")]


def expected_rankings(result: InfluenceResult, n_val: int, k: int) -> list[tuple[str, int, float]]:
    """(kind, train index, score) in the order the tables list them, per validation column."""
    helpful, harmful = result.helpful(k), result.harmful(k)
    out = []
    for j in range(n_val):
        for kind, ranking in (("helpful", helpful), ("harmful", harmful)):
            pairs = zip(ranking.indices[j].tolist(), ranking.scores[j].tolist(), strict=True)
            out += [(kind, i, s) for i, s in pairs]
    return out


def colour_pixels(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> np.ndarray:
    return (np.abs(img[..., :3].astype(int) - np.array(rgb)) <= tol).all(-1)


def tensorboard_events(logdir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(str(logdir / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    kinds = ("images", "histograms", "scalars", "tensors")
    acc = EventAccumulator(files[0], size_guidance={k: 0 for k in kinds})
    acc.Reload()
    return acc


def tb_text(acc: Any, tag: str) -> str:
    from tensorboard.util.tensor_util import make_ndarray

    events = acc.Tensors(f"{tag}/text_summary")
    assert len(events) == 1
    return make_ndarray(events[0].tensor_proto).item().decode()


def wandb_records(path: Path) -> Iterator[Any]:
    """Records of a W&B ``.wandb`` run log (LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" or len(data) < 4  # a file still being written may be empty
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        if len(payload) < length:  # the tail of a file still being written
            break
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        assert zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF == crc
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending + payload)
            pending = b""
            yield record
        else:
            pending = (pending if kind == 3 else b"") + payload


def wandb_offline_run(
    folder: Path,
) -> tuple[dict[str, Any], dict[tuple[str, str], dict[str, Path]]]:
    """The summary and the artifacts' manifests (path -> staged local file) of the one offline run
    in ``folder``, read from its ``.wandb`` log."""
    (log_file,) = folder.glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(log_file))
    deadline = time.monotonic() + 60  # wandb.finish() can return before its writer flushes
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"no exit record in {log_file} after 60 s"
        time.sleep(0.2)
        records = list(wandb_records(log_file))
    summary: dict[str, Any] = {}
    artifacts = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            for item in record.summary.update:  # nested values come one leaf at a time
                *outer, leaf = list(item.nested_key) or [item.key]
                node = summary
                for key in outer:
                    node = node.setdefault(key, {})
                node[leaf] = json.loads(item.value_json)
        elif kind == "artifact":
            manifest = {c.path: Path(c.local_path) for c in record.artifact.manifest.contents}
            artifacts[record.artifact.type, record.artifact.name] = manifest
    return summary, artifacts


def wandb_table(
    artifacts: dict[tuple[str, str], dict[str, Path]], key: str
) -> tuple[list[str], list[list[Any]], dict[str, Path]]:
    """Columns, rows and manifest of the W&B table logged under ``key``."""
    (manifest,) = [m for m in artifacts.values() if f"{key}.table.json" in m]
    data = json.loads(manifest[f"{key}.table.json"].read_text())
    return data["columns"], data["data"], manifest
