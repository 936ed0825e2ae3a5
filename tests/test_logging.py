"""Influence logging, read back from what was really written: TensorBoard event files, the W&B
offline run log and its staged table artifact, and the plain files (CSV, PNG, markdown)."""

from __future__ import annotations

import csv
import functools
import glob
import io
import json
import math
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from digits import DigitsCNN, DigitsDataModule
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch.utils.data import TensorDataset

from lightning_influence import ClassificationTask, Exact, InfluenceResult, compute_influence
from lightning_influence.report import LogSettings, log_influence

N_VAL, TOP_K, N_OUT = 3, 4, 12
SETTINGS = LogSettings(n_val=N_VAL, top_k=TOP_K, n_outliers=N_OUT)
HELPFUL_RGB = (34, 140, 34)  # the frame colours of logging.py, as 8-bit RGB
HARMFUL_RGB = (214, 38, 41)


class Digits:
    """A real influence result on digits: a tiny CNN trained briefly, 300 x 16 examples."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.dm = DigitsDataModule(n_train=400, flip_fraction=0.1)
        model = DigitsCNN(channels=2)
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        x, y = self.dm.train_dataset.tensors
        for _ in range(30):
            for idx in torch.randperm(len(y)).split(100):
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        self.result = compute_influence(
            model,
            self.dm.train_dataset,
            self.dm.val_dataset,
            solver=Exact(),
            damping=1e-2,
            train_indices=torch.arange(50, 350),  # dataset indices != row positions
            val_indices=torch.arange(10, 26),
            perturbation_k=TOP_K,
            progress=False,
        )

    def log(self, loggers: list[Any], out: Path, **kwargs: Any) -> list[Path]:
        return log_influence(
            self.result,
            loggers,
            self.dm.train_dataset,
            self.dm.val_dataset,
            ClassificationTask(),
            out,
            kwargs.pop("settings", SETTINGS),
            **kwargs,
        )


@functools.cache
def digits_case() -> Digits:
    """Computed once per session and shared with the browser tests (nothing mutates it)."""
    torch.set_num_threads(1)
    return Digits()


@pytest.fixture
def digits() -> Digits:
    return digits_case()


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
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
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


# --------------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------------


def test_tensorboard_images_tables_histograms_scalars(digits: Digits, tmp_path: Path) -> None:
    result = digits.result
    files = digits.log([TensorBoardLogger(tmp_path, name="tb")], tmp_path / "out", step=7)
    acc = tensorboard_events(tmp_path / "tb")
    tags = acc.Tags()
    val_ids = result.val_indices[:N_VAL].tolist()
    assert set(tags["images"]) == {f"influence/val_{i}" for i in val_ids} | {"influence/outliers"}

    # One panel per validation example: legible tiles, green and red frames, saliency colours.
    for i in val_ids:
        (event,) = acc.Images(f"influence/val_{i}")
        assert event.step == 7
        img = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        assert img.shape[1] >= (1 + TOP_K) * 64 and img.shape[0] >= 4 * 64  # 4 rows of tiles
        assert img.std() > 30
        for rgb in (HELPFUL_RGB, HARMFUL_RGB):
            _, xs = np.nonzero(colour_pixels(img, rgb))
            assert xs.max() - xs.min() > TOP_K * 64  # a frame around every top example
        # each tile is drawn at least 64 px wide: the longest run of frame colour in a row
        longest = max(
            np.diff(np.flatnonzero(np.diff(r.astype(int)))).max(initial=0)
            for r in colour_pixels(img, HELPFUL_RGB)
        )
        assert longest >= 64
        reddish = (img[..., 0] > 200) & (img[..., 1] < 150) & (img[..., 2] < 150)
        bluish = (img[..., 2] > 200) & (img[..., 0] < 150) & (img[..., 1] < 150)
        assert reddish.sum() > 500 and bluish.sum() > 200  # saliency maps drawn

    (outliers_img,) = acc.Images("influence/outliers")
    assert outliers_img.width >= 8 * 64 and outliers_img.height >= 64 * math.ceil(N_OUT / 8)

    # Markdown tables name the right dataset indices, ranks and scores.
    expected = expected_rankings(result, N_VAL, TOP_K)
    got = []
    for j, i in enumerate(val_ids):
        text = tb_text(acc, f"influence/val_{i}")
        assert f"**Validation example {i}**: label {int(result.val_targets[j])}" in text
        got += [(r[0], int(r[2]), float(r[5])) for r in table_rows(text)]
    assert [(k, i) for k, i, _ in got] == [(k, i) for k, i, _ in expected]
    np.testing.assert_allclose([s for *_, s in got], [s for *_, s in expected], rtol=1e-3)

    rows = table_rows(tb_text(acc, "influence/outliers"))
    outliers = result.outliers(N_OUT)
    assert [int(r[1]) for r in rows] == outliers.indices.tolist()
    np.testing.assert_allclose([float(r[4]) for r in rows], outliers.scores, rtol=1e-3)
    pos = {int(i): n for n, i in enumerate(result.train_indices)}
    labels = [int(result.train_targets[pos[int(r[1])]]) for r in rows]
    assert [int(r[2]) for r in rows] == labels
    assert "time_total" in tb_text(acc, "influence/summary")

    median = float(result.self_influence.median())
    np.testing.assert_allclose([float(r[5]) for r in rows], outliers.scores / median, rtol=1e-2)

    # Histograms hold every value, self-influence on a log scale.
    hist = acc.Histograms("influence/log10_self_influence")[0].histogram_value
    positive = result.self_influence[result.self_influence > 0].double()
    assert hist.num == positive.numel() >= result.n_train - 2
    assert hist.sum == pytest.approx(float(positive.log10().sum()), rel=1e-4)
    assert acc.Histograms("influence/scores")[0].histogram_value.num == result.scores.numel()
    # The diagnostics are one text table, not a single-point chart each.
    assert tags["scalars"] == []
    summary = dict(table_rows(tb_text(acc, "influence/summary")))
    for key, value in result.diagnostics.items():
        assert float(summary[key]) == pytest.approx(value, rel=1e-3)
    # The CSV tables and the dashboard are always written; images and markdown only for others.
    assert [f.relative_to(tmp_path / "out").as_posix() for f in files] == [
        "influence_outliers.csv",
        "influence_rankings.csv",
        "influence_dashboard/index.json",
    ]


# --------------------------------------------------------------------------------------------
# Weights & Biases, offline
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # a W&B run starts its service process: several seconds
def test_wandb_offline_tables_images_histograms_artifact(digits: Digits, tmp_path: Path) -> None:
    import wandb

    result = digits.result
    saved = result.save(tmp_path / "influence.pt")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="logging-test")
    digits.log([logger], tmp_path / "out", result_path=saved)
    wandb.finish()
    (log_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")

    summary: dict[str, Any] = {}
    artifacts = {}
    for record in wandb_records(log_file):
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

    # The saved result file travels as an artifact and loads back equal.
    (result_manifest,) = [m for (t, _), m in artifacts.items() if t == "influence"]
    assert InfluenceResult.load(result_manifest["influence.pt"]).equals(result)

    def table(name: str) -> tuple[list[str], list[list[Any]], dict[str, Path]]:
        (manifest,) = [m for m in artifacts.values() if f"influence/{name}.table.json" in m]
        data = json.loads(manifest[f"influence/{name}.table.json"].read_text())
        return data["columns"], data["data"], manifest

    def image(cell: dict[str, Any], manifest: dict[str, Path]) -> np.ndarray:
        return np.asarray(Image.open(manifest[cell["path"]]).convert("RGB"))

    columns, rows, manifest = table("rankings")
    assert len(rows) == N_VAL * 2 * TOP_K
    col = {c: n for n, c in enumerate(columns)}
    expected = expected_rankings(result, N_VAL, TOP_K)
    assert [(r[col["kind"]], r[col["train_index"]]) for r in rows] == [e[:2] for e in expected]
    np.testing.assert_allclose([r[col["score"]] for r in rows], [e[2] for e in expected], rtol=1e-6)
    x = digits.dm.train_dataset.tensors[0]
    for r in rows[:: TOP_K + 1]:
        tile = image(r[col["image"]], manifest)
        assert tile.shape == (64, 64, 3)  # 8x8 upscaled 8x, nearest: each pixel an 8x8 block
        original = x[r[col["train_index"]], 0].numpy()
        np.testing.assert_allclose(tile[4::8, 4::8, 0] / 255, original, atol=1 / 255 + 1e-6)
        saliency = image(r[col["saliency"]], manifest)
        assert saliency.shape == (64, 64, 3) and saliency.std() > 5

    columns, rows, manifest = table("outliers")
    outliers = result.outliers(N_OUT)
    assert [r[columns.index("index")] for r in rows] == outliers.indices.tolist()
    assert [r[columns.index("rank")] for r in rows] == list(range(1, N_OUT + 1))
    np.testing.assert_allclose([r[columns.index("self_influence")] for r in rows], outliers.scores)
    assert image(rows[0][columns.index("image")], manifest).shape == (64, 64, 3)

    assert summary["influence/log10_self_influence"]["_type"] == "histogram"
    positive = int((result.self_influence > 0).sum())
    assert sum(summary["influence/log10_self_influence"]["values"]) == positive
    assert sum(summary["influence/scores"]["values"]) == result.scores.numel()
    for key, value in result.diagnostics.items():
        assert summary[f"influence/{key}"] == pytest.approx(value)
    for i in result.val_indices[:N_VAL].tolist():
        assert summary[f"influence/val_{i}"]["_type"] == "image-file"
        assert summary[f"influence/val_{i}"]["width"] >= (1 + TOP_K) * 64


# --------------------------------------------------------------------------------------------
# Plain files (CSVLogger, no logger)
# --------------------------------------------------------------------------------------------


def test_csv_logger_gets_files_and_review_list(digits: Digits, tmp_path: Path) -> None:
    result = digits.result
    logger = CSVLogger(tmp_path, name="csv")
    files = digits.log([logger], tmp_path / "out")
    names = sorted(f.name for f in files)
    val_ids = result.val_indices[:N_VAL].tolist()
    assert names == sorted(
        ["influence_outliers.csv", "influence_rankings.csv", "influence_outliers.png"]
        + [f"influence_val_{i}.png" for i in val_ids]
        + ["influence_histograms.png", "influence.md", "influence_diagnostics.json", "index.json"]
    )
    assert all(f.stat().st_size > 0 for f in files)
    assert {f.parent for f in files} == {tmp_path / "out", tmp_path / "out" / "influence_dashboard"}

    # The review list equals result.outliers, with the given and predicted labels.
    with (tmp_path / "out" / "influence_outliers.csv").open() as f:
        rows = list(csv.DictReader(f))
    outliers = result.outliers(N_OUT)
    assert [int(r["index"]) for r in rows] == outliers.indices.tolist()
    np.testing.assert_allclose(
        [float(r["self_influence"]) for r in rows], outliers.scores, rtol=1e-7
    )
    pos = {int(i): n for n, i in enumerate(result.train_indices)}
    assert [r["given_label"] for r in rows] == [
        str(int(result.train_targets[pos[int(r["index"])]])) for r in rows
    ]
    assert [r["predicted_label"] for r in rows] == [
        str(int(result.train_predictions[pos[int(r["index"])]])) for r in rows
    ]

    with (tmp_path / "out" / "influence_rankings.csv").open() as f:
        rankings = list(csv.DictReader(f))
    expected = expected_rankings(result, N_VAL, TOP_K)
    assert [(r["kind"], int(r["train_index"])) for r in rankings] == [e[:2] for e in expected]

    png = np.asarray(Image.open(tmp_path / "out" / f"influence_val_{val_ids[0]}.png"))
    assert png.shape[1] >= (1 + TOP_K) * 64 and png.std() > 30
    report = (tmp_path / "out" / "influence.md").read_text()
    assert f"![validation example {val_ids[0]}](influence_val_{val_ids[0]}.png)" in report
    assert [int(r[1]) for r in table_rows(report.split("## Self-influence")[1])] == (
        outliers.indices.tolist()
    )
    # Diagnostics reach the CSV logger's metrics file too.
    with (Path(logger.log_dir) / "metrics.csv").open() as f:
        metrics = list(csv.DictReader(f))
    assert float(metrics[0]["influence/time_total"]) == pytest.approx(
        result.diagnostics["time_total"]
    )


def test_without_matplotlib_plain_grids(
    digits: Digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    files = digits.log([], tmp_path, settings=LogSettings(n_val=1, top_k=3, n_outliers=5))
    val = int(digits.result.val_indices[0])
    img = np.asarray(Image.open(tmp_path / f"influence_val_{val}.png"))
    # [val | 3 tiles] x 4 rows of 64 px tiles + 12 px frame and padding each, no text
    assert img.shape == (4 * 76, 4 * 76, 3)
    assert colour_pixels(img, HELPFUL_RGB, tol=2).sum() > 3 * 4 * 64
    assert not (tmp_path / "influence_histograms.png").exists()
    assert "influence.md" in [f.name for f in files]


def test_without_perturbation_and_selected_val_indices(digits: Digits, tmp_path: Path) -> None:
    import dataclasses

    result = dataclasses.replace(digits.result, perturbation=None, perturbation_indices=None)
    chosen = (int(result.val_indices[5]), int(result.val_indices[2]))
    settings = LogSettings(top_k=2, n_outliers=3, val_indices=chosen, prefix="run/infl")
    log_influence(
        result,
        [TensorBoardLogger(tmp_path, name="tb")],
        digits.dm.train_dataset,
        digits.dm.val_dataset,
        ClassificationTask(),
        tmp_path,
        settings,
    )
    acc = tensorboard_events(tmp_path / "tb")
    assert set(acc.Tags()["images"]) == {f"run/infl/val_{i}" for i in chosen} | {
        "run/infl/outliers"
    }
    (event,) = acc.Images(f"run/infl/val_{chosen[0]}")
    assert 2 * 64 <= event.height < 4 * 76 * 1.5  # two rows (helpful, harmful), no saliency rows
    rows = table_rows(tb_text(acc, f"run/infl/val_{chosen[0]}"))
    assert [int(r[2]) for r in rows[:2]] == result.helpful(2, val_index=chosen[0]).indices[
        0
    ].tolist()
    assert (tmp_path / "run_infl_outliers.csv").exists()
    with pytest.raises(ValueError, match=r"`val_indices` names validation dataset index 99999"):
        log_influence(
            result,
            [],
            digits.dm.train_dataset,
            digits.dm.val_dataset,
            ClassificationTask(),
            tmp_path,
            LogSettings(val_indices=(99999,)),
        )


def test_text_inputs_use_describe(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    data = TensorDataset(x, y)
    result = compute_influence(
        torch.nn.Linear(5, 3), data, data, solver=Exact(), damping=0.1, progress=False
    )
    settings = LogSettings(n_val=2, top_k=2, n_outliers=4, describe=lambda v: f"x0={v[0]:.2f}")
    log_influence(
        result,
        [TensorBoardLogger(tmp_path, name="tb")],
        data,
        data,
        ClassificationTask(),
        tmp_path,
        settings,
    )
    acc = tensorboard_events(tmp_path / "tb")
    assert acc.Tags()["images"] == []  # feature vectors are not images
    rows = table_rows(tb_text(acc, "influence/outliers"))
    first = int(result.outliers(4).indices[0])
    assert rows[0][1] == str(first) and rows[0][6] == f"`x0={x[first, 0]:.2f}`"


def test_nothing_logged_off_rank_zero(
    digits: Digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert digits.log([CSVLogger(tmp_path, name="csv")], tmp_path / "out") == []
    assert not (tmp_path / "out").exists() and not (tmp_path / "csv").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_val": -1}, "`n_val` must be at least 0, got -1"),
        ({"image_size": 4}, "`image_size` must be at least 8"),
        ({"prefix": "/influence"}, "`prefix` must be a non-empty tag"),
    ],
)
def test_settings_are_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LogSettings(**kwargs)
