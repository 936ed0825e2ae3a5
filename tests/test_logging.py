"""Influence logging, read back from what was really written: TensorBoard event files, the W&B
offline run log and its staged table artifact, and the plain files (CSV, PNG, markdown)."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from report_case import (
    HARMFUL_RGB,
    HELPFUL_RGB,
    N_OUT,
    N_VAL,
    TOP_K,
    Digits,
    colour_pixels,
    digits_case,
    expected_rankings,
    table_rows,
    tb_text,
    tensorboard_events,
    text_case,
    wandb_offline_run,
    wandb_table,
)
from torch.utils.data import TensorDataset

from lightning_influence import ClassificationTask, Exact, InfluenceResult, compute_influence
from lightning_influence.report import LogSettings, log_influence


@pytest.fixture
def digits() -> Digits:
    return digits_case()


def expected_relative(result: InfluenceResult, n_val: int, k: int) -> list[tuple[str, int, float]]:
    """(kind, train index, relative score) of the relative rankings, as the tables list them."""
    helpful, harmful = result.helpful(k, relative=True), result.harmful(k, relative=True)
    out = []
    for j in range(n_val):
        for kind, ranking in (("helpful", helpful), ("harmful", harmful)):
            pairs = zip(ranking.indices[j].tolist(), ranking.scores[j].tolist(), strict=True)
            out += [(kind, i, s) for i, s in pairs]
    return out


# --------------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------------


def test_tensorboard_images_tables_histograms_summary(digits: Digits, tmp_path: Path) -> None:
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
    got, got_relative = [], []
    for j, i in enumerate(val_ids):
        text = tb_text(acc, f"influence/val_{i}")
        assert f"**Validation example {i}**: label {int(result.val_targets[j])}" in text
        assert "*Relative* ranking" in text and "*Raw* ranking" in text
        rows = table_rows(text)  # the relative ranking's table, then the raw one's
        assert len(rows) == 4 * TOP_K
        got += [(r[0], int(r[2]), float(r[5])) for r in rows[2 * TOP_K :]]
        got_relative += [(r[0], int(r[2]), float(r[6])) for r in rows[: 2 * TOP_K]]
        removal = [float(r[7]) for r in rows[2 * TOP_K :]]  # "if removed": -score / n_train
        np.testing.assert_allclose(removal, [-s / 300 for *_, s in got[-2 * TOP_K :]], rtol=5e-3)
    assert [(k, i) for k, i, _ in got] == [(k, i) for k, i, _ in expected]
    np.testing.assert_allclose([s for *_, s in got], [s for *_, s in expected], rtol=1e-3)
    relative = expected_relative(result, N_VAL, TOP_K)
    assert [(k, i) for k, i, _ in got_relative] == [(k, i) for k, i, _ in relative]
    np.testing.assert_allclose([s for *_, s in got_relative], [s for *_, s in relative], rtol=1e-3)

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
    summary, artifacts = wandb_offline_run(tmp_path / "wandb")

    # The saved result file travels as an artifact and loads back equal.
    (result_manifest,) = [m for (t, _), m in artifacts.items() if t == "influence"]
    assert InfluenceResult.load(result_manifest["influence.pt"]).equals(result)

    def table(name: str) -> tuple[list[str], list[list[Any]], dict[str, Path]]:
        return wandb_table(artifacts, f"influence/{name}")

    def image(cell: dict[str, Any], manifest: dict[str, Path]) -> np.ndarray:
        return np.asarray(Image.open(manifest[cell["path"]]).convert("RGB"))

    columns, all_rows, manifest = table("rankings")
    assert len(all_rows) == N_VAL * 4 * TOP_K  # the relative rankings and the raw ones
    col = {c: n for n, c in enumerate(columns)}
    rows = [r for r in all_rows if r[col["ranking"]] == "raw"]
    relative = [r for r in all_rows if r[col["ranking"]] == "relative"]
    expected = expected_relative(result, N_VAL, TOP_K)
    assert [(r[col["kind"]], r[col["train_index"]]) for r in relative] == [e[:2] for e in expected]
    got = [r[col["relative_score"]] for r in relative]
    np.testing.assert_allclose(got, [e[2] for e in expected], rtol=1e-6)
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

    columns, rows, manifest = table("validation")  # every scored validation example
    col = {c: n for n, c in enumerate(columns)}
    assert [r[col["val_index"]] for r in rows] == result.val_indices.tolist()
    correct = (result.val_targets == result.val_predictions).tolist()
    assert [r[col["correct"]] for r in rows] == correct
    np.testing.assert_allclose([r[col["loss"]] for r in rows], result.val_losses, rtol=1e-6)
    np.testing.assert_allclose([r[col["spread"]] for r in rows], result.scores.std(0), rtol=1e-5)
    assert image(rows[0][col["image"]], manifest).shape == (64, 64, 3)

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
        every = list(csv.DictReader(f))
    rankings = [r for r in every if r["ranking"] == "raw"]
    relative = [r for r in every if r["ranking"] == "relative"]
    expected = expected_relative(result, N_VAL, TOP_K)
    assert [(r["kind"], int(r["train_index"])) for r in relative] == [e[:2] for e in expected]
    np.testing.assert_allclose(
        [float(r["relative_score"]) for r in relative], [e[2] for e in expected], rtol=1e-7
    )
    row = {int(i): n for n, i in enumerate(result.train_indices)}
    col = {int(i): n for n, i in enumerate(result.val_indices)}
    raw = [result.scores[row[int(r["train_index"])], col[int(r["val_index"])]] for r in relative]
    np.testing.assert_allclose([float(r["score"]) for r in relative], raw, rtol=1e-7)
    expected = expected_rankings(result, N_VAL, TOP_K)
    assert [(r["kind"], int(r["train_index"])) for r in rankings] == [e[:2] for e in expected]
    position = {int(i): n for n, i in enumerate(result.train_indices)}
    removal = [
        float(result.removal_effect[position[int(r["train_index"])], j])
        for j in range(N_VAL)
        for r in rankings[j * 2 * TOP_K : (j + 1) * 2 * TOP_K]
    ]
    np.testing.assert_allclose([float(r["removal_effect"]) for r in rankings], removal, rtol=1e-6)

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


def test_without_matplotlib_lettered_figures(
    digits: Digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_influence.report.lettering import Lettering, font, text_width

    settings = LogSettings(n_val=1, top_k=3, n_outliers=5)
    digits.log([], tmp_path / "with", settings=settings)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    files = digits.log([], tmp_path, settings=settings)
    val = int(digits.result.val_indices[0])
    name = f"influence_val_{val}.png"
    img = np.asarray(Image.open(tmp_path / name))
    np.testing.assert_array_equal(img, np.asarray(Image.open(tmp_path / "with" / name)))
    # Above the first green frame: the title and the validation tile's caption, in black ink.
    first_frame = int(np.nonzero(colour_pixels(img, HELPFUL_RGB, tol=2).any(1))[0][0])
    ink = (img[:first_frame].max(-1) < 100).sum(0)
    assert ink.sum() > 300 and np.count_nonzero(ink) > img.shape[1] // 2
    assert colour_pixels(img, HELPFUL_RGB, tol=2).sum() > 3 * 4 * 64
    histograms = np.asarray(Image.open(tmp_path / "influence_histograms.png"))
    assert (histograms.max(-1) < 100).sum() > 500  # tick labels, titles
    assert "influence.md" in [f.name for f in files]
    # Pillow's own font: a caption's ink spans the width the font measures for it.
    face = font(6, 150)
    assert face is not None and face.getname()[0] == "Aileron"
    board = np.full((40, 200, 3), 255, np.uint8)
    Lettering(board).text(100, 20, "label 3 pred 3", face)
    columns = np.nonzero((board.max(-1) < 160).any(0))[0]
    assert abs(columns[-1] + 1 - columns[0] - text_width("label 3 pred 3", face)) <= 2
    assert text_width("\u22121", face) == text_width("-1", face)  # a minus the font lacks


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
    rows = table_rows(tb_text(acc, f"run/infl/val_{chosen[0]}"))  # relative, then raw
    helpful = result.helpful(2, val_index=chosen[0], relative=True)
    assert [int(r[2]) for r in rows[:2]] == helpful.indices[0].tolist()
    assert [int(r[2]) for r in rows[4:6]] == result.helpful(2, val_index=chosen[0]).indices[
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


def linear_case(n: int, features: int, classes: int) -> tuple[torch.Tensor, Any, InfluenceResult]:
    """Random feature vectors, a linear model on them (untrained) and its exact influence."""
    torch.manual_seed(0)
    x, y = torch.randn(n, features), torch.randint(0, classes, (n,))
    data = TensorDataset(x, y)
    model = torch.nn.Linear(features, classes)
    return (
        x,
        data,
        compute_influence(model, data, data, solver=Exact(), damping=0.1, progress=False),
    )


def test_text_inputs_use_describe(tmp_path: Path) -> None:
    x, data, result = linear_case(40, 5, 3)
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


def test_dashboard_index_matches_the_result(digits: Digits, tmp_path: Path) -> None:
    result = digits.result
    digits.log([], tmp_path)
    folder = tmp_path / "influence_dashboard"
    index = json.loads((folder / "index.json").read_text())
    assert (index["format"], index["version"], index["kind"]) == (
        "lightning-influence-dashboard",
        1,
        "image",
    )
    # every scored validation example (16 < dashboard_size), in the result's order
    assert [v["index"] for v in index["validation"]] == result.val_indices.tolist()
    helpful, harmful = result.helpful(TOP_K), result.harmful(TOP_K)
    for j, v in enumerate(index["validation"]):
        assert v["correct"] == (result.val_targets[j] == result.val_predictions[j]).item()
        assert v["loss"] == pytest.approx(float(result.val_losses[j]), rel=1e-6)
        assert v["spread"] == pytest.approx(float(result.scores[:, j].std()), rel=1e-5)
        for kind, ranking in (("helpful", helpful), ("harmful", harmful)):
            assert [e["index"] for e in v[kind]] == ranking.indices[j].tolist()
            relative = getattr(result, kind)(TOP_K, relative=True)
            assert [e["index"] for e in v["relative"][kind]] == relative.indices[j].tolist()
            np.testing.assert_allclose(
                [e["relative_score"] for e in v["relative"][kind]], relative.scores[j], rtol=1e-6
            )
            rows = [
                int((result.train_indices == e["index"]).nonzero()) for e in v["relative"][kind]
            ]
            np.testing.assert_allclose(
                [e["score"] for e in v["relative"][kind]], result.scores[rows, j], rtol=1e-6
            )
            np.testing.assert_allclose([e["score"] for e in v[kind]], ranking.scores[j], rtol=1e-6)
            rows = [int((result.train_indices == e["index"]).nonzero()) for e in v[kind]]
            np.testing.assert_allclose(
                [e["removal_effect"] for e in v[kind]],
                result.removal_effect[rows, j],
                rtol=1e-5,
            )
    # maps where computed: the first perturbation_k of each kind
    first = index["validation"][0]
    assert all(e["saliency"] == f"map_{first['index']}_{e['index']}.png" for e in first["helpful"])
    # the review: the first dashboard_size (128) of the 300 training examples
    review = index["review"]
    outliers = result.outliers(128)
    assert [r["index"] for r in review["rows"]] == outliers.indices.tolist()
    median = float(result.self_influence.median())
    assert review["median"] == pytest.approx(median, rel=1e-6) and review["n_train"] == 300
    np.testing.assert_allclose(
        [r["times_median"] for r in review["rows"]], outliers.scores / median, rtol=1e-5
    )
    # pictures: each training digit once, its 8x8 pixels as 8x8 blocks of the 64 px tile
    x = digits.dm.train_dataset.tensors[0]
    e = first["helpful"][0]
    tile = np.asarray(Image.open(folder / e["image"]).convert("L"))
    assert tile.shape == (64, 64)
    np.testing.assert_allclose(tile[4::8, 4::8] / 255, x[e["index"], 0], atol=1 / 255 + 1e-6)
    assert len(list(folder.glob("train_*.png"))) == len(
        {e["index"] for v in index["validation"] for k in ("helpful", "harmful") for e in v[k]}
        | {e["index"] for v in index["validation"] for r in v["relative"].values() for e in r}
        | set(outliers.indices.tolist())
    )


def test_text_examples_in_text_tab_and_dashboard(tmp_path: Path) -> None:
    case = text_case()
    result, decode = case.result, case.dm.train.decode
    ids = case.dm.train_dataset.tensors[0]
    case.log([TensorBoardLogger(tmp_path, name="tb")], tmp_path / "out")
    acc = tensorboard_events(tmp_path / "tb")
    assert acc.Tags()["images"] == []
    v = int(result.val_indices[0])
    text = tb_text(acc, f"influence/val_{v}")
    assert f"Input: `{decode(case.dm.val_dataset.tensors[0][v])}`" in text
    rows = table_rows(text)
    helpful = result.helpful(3, relative=True).indices[0].tolist()
    assert [int(r[2]) for r in rows[:3]] == helpful
    assert [r[8] for r in rows[:3]] == [f"`{decode(ids[i])}`" for i in helpful]
    labels = {r[3] for r in rows} | {r[4] for r in rows}
    assert labels <= {"sport", "weather", "cooking"}  # class names, not integers

    index = json.loads((tmp_path / "out" / "influence_dashboard" / "index.json").read_text())
    assert index["kind"] == "text"
    first = index["validation"][0]
    assert [e["text"] for e in first["relative"]["helpful"]] == [decode(ids[i]) for i in helpful]
    raw = result.helpful(3).indices[0].tolist()
    assert [e["text"] for e in first["helpful"]] == [decode(ids[i]) for i in raw]
    assert all(e["image"] is None for e in first["helpful"])
    assert not list((tmp_path / "out" / "influence_dashboard").glob("*.png"))


def test_table_examples_with_feature_names(tmp_path: Path) -> None:
    x, data, result = linear_case(30, 3, 2)
    names = ("age", "income", "height")
    settings = LogSettings(n_val=1, top_k=2, n_outliers=3, kind="table", feature_names=names)
    task = ClassificationTask()
    log_influence(
        result, [TensorBoardLogger(tmp_path, name="tb")], data, data, task, tmp_path, settings
    )
    index = json.loads((tmp_path / "influence_dashboard" / "index.json").read_text())
    assert index["kind"] == "table" and index["feature_names"] == list(names)
    top = index["review"]["rows"][0]
    assert top["fields"] == [
        [n, f"{float(v):.4g}"] for n, v in zip(names, x[top["index"]], strict=True)
    ]
    rows = table_rows(tb_text(tensorboard_events(tmp_path / "tb"), "influence/outliers"))
    assert rows[0][6] == "`" + ", ".join(f"{n}={v}" for n, v in top["fields"]) + "`"
    wrong = LogSettings(kind="table", feature_names=("age",))
    with pytest.raises(ValueError, match="`feature_names` names 1 features but an input holds 3"):
        log_influence(result, [], data, data, task, tmp_path, wrong)


@pytest.mark.slow  # trains the text example for two epochs through a Trainer
def test_text_example_shows_sentences_from_the_callback(tmp_path: Path) -> None:
    from text_influence import TOPICS, TextDataModule, main

    result = main(["--epochs", "2", "--num-val", "6", "--quiet", "--runs", str(tmp_path)])
    folder = tmp_path / "text_influence" / "version_0" / "influence"
    saved = InfluenceResult.load(folder / "influence.pt")
    assert torch.equal(saved.scores, result.scores)
    assert torch.equal(saved.val_indices, result.val_indices)
    index = json.loads((folder / "influence_dashboard" / "index.json").read_text())
    assert index["kind"] == "text" and len(index["validation"]) == 6
    data = TextDataModule()  # the same generated corpus (seed 0)
    first = index["validation"][0]
    assert first["text"] == data.train.decode(data.val_dataset.tensors[0][first["index"]])
    top = result.helpful(6, val_index=first["index"]).indices[0].tolist()
    assert [e["index"] for e in first["helpful"]] == top
    assert [e["text"] for e in first["helpful"]] == [
        data.train.decode(data.train.ids[i]) for i in top
    ]
    assert {e["label"] for e in first["helpful"]} <= set(TOPICS)


@pytest.mark.slow  # a W&B run starts its service process: several seconds
def test_wandb_offline_text_columns(tmp_path: Path) -> None:
    import wandb

    case = text_case()
    result, decode = case.result, case.dm.train.decode
    case.log([WandbLogger(save_dir=str(tmp_path), offline=True, project="text-test")], tmp_path)
    wandb.finish()
    _, artifacts = wandb_offline_run(tmp_path / "wandb")
    columns, rows, _ = wandb_table(artifacts, "influence/rankings")
    col = {c: n for n, c in enumerate(columns)}
    assert "image" not in col
    ids, val_ids = case.dm.train_dataset.tensors[0], case.dm.val_dataset.tensors[0]
    for r in rows:
        assert r[col["input"]] == decode(ids[r[col["train_index"]]])
        assert r[col["val_input"]] == decode(val_ids[r[col["val_index"]]])
    columns, rows, _ = wandb_table(artifacts, "influence/outliers")
    assert [r[columns.index("index")] for r in rows] == result.outliers(5).indices.tolist()
    assert [r[columns.index("input")] for r in rows] == [
        decode(ids[i]) for i in result.outliers(5).indices
    ]


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
