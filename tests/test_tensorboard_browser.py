"""What TensorBoard really shows: a TensorBoard server on 127.0.0.1 serves our text, images,
histograms and scalars through its data endpoints, and a headless Chromium renders the images page
with our influence panel on it."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from test_logging import (
    HARMFUL_RGB,
    HELPFUL_RGB,
    N_OUT,
    N_VAL,
    TOP_K,
    Digits,
    digits_case,
    tensorboard_events,
)

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Server:
    """``tensorboard --logdir`` on a free loopback port, in a subprocess."""

    def __init__(self, logdir: Path) -> None:
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)),
                *("--host", "127.0.0.1", "--port", "0", "--load_fast", "false"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 120
        self.url = ""
        while not self.url and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited with {self.proc.returncode}")
            found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            self.url = found.group(1) if found else ""
        assert self.url, "tensorboard did not print its URL within 120 s"

    def get(self, path: str, **params: str) -> bytes:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=30) as response:
            return response.read()

    def json(self, path: str, **params: str) -> Any:
        return json.loads(self.get(path, **params))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Digits, Path]:
    digits = digits_case()
    root = tmp_path_factory.mktemp("tb")
    digits.log([TensorBoardLogger(root, name="digits")], root / "influence")
    return digits, root


@pytest.fixture(scope="module")
def server(logged: tuple[Digits, Path]) -> Iterator[Server]:
    server = Server(logged[1])
    try:
        deadline = time.monotonic() + 60  # the first load runs in the background
        while time.monotonic() < deadline:
            tags = server.json("/data/plugin/images/tags")
            if any("influence/outliers" in t for t in tags.values()):
                break
            time.sleep(0.5)
        yield server
    finally:
        server.close()


def html_rows(html: str) -> list[list[str]]:
    """Cells of each body row of the HTML tables."""
    rows = re.findall(r"<tr>(.*?)</tr>", html, re.S)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in rows]
    return [[c.strip() for c in row] for row in cells if row]


def test_server_endpoints_serve_our_text_images_histograms(
    logged: tuple[Digits, Path], server: Server
) -> None:
    digits, root = logged
    result = digits.result
    assert server.json("/data/runs") == ["digits/version_0"]
    run = "digits/version_0"
    val_ids = result.val_indices[:N_VAL].tolist()

    text_tags = set(server.json("/data/plugin/text/tags")[run])
    wanted = [f"influence/val_{i}" for i in val_ids] + ["influence/outliers", "influence/summary"]
    assert {f"{t}/text_summary" for t in wanted} <= text_tags
    (entry,) = server.json("/data/plugin/text/text", run=run, tag="influence/outliers/text_summary")
    html = entry["text"]  # markdown rendered to HTML by the server
    assert "<table>" in html
    assert [int(r[1]) for r in html_rows(html)] == result.outliers(N_OUT).indices.tolist()
    tag = f"influence/val_{val_ids[0]}/text_summary"
    (entry,) = server.json("/data/plugin/text/text", run=run, tag=tag)
    rows = html_rows(entry["text"])
    assert [int(r[2]) for r in rows if r[0] == "helpful"] == result.helpful(TOP_K)[0][0].tolist()
    assert [int(r[2]) for r in rows if r[0] == "harmful"] == result.harmful(TOP_K)[0][0].tolist()

    # The served image is the PNG of the event file, byte for byte.
    acc = tensorboard_events(root / "digits")
    for tag in [f"influence/val_{i}" for i in val_ids] + ["influence/outliers"]:
        (meta,) = server.json("/data/plugin/images/images", run=run, tag=tag, sample="0")
        png = server.get(f"/data/plugin/images/individualImage?{meta['query']}")
        assert png == acc.Images(tag)[0].encoded_image_string
        img = Image.open(io.BytesIO(png))
        assert img.format == "PNG" and img.width >= (1 + min(TOP_K, 8)) * 64

    (hist,) = server.json("/data/plugin/histograms/histograms", run=run, tag="influence/scores")
    _, step, buckets = hist
    assert step == 0 and sum(b[2] for b in buckets) == pytest.approx(result.scores.numel())
    ((_, _, value),) = server.json(
        "/data/plugin/scalars/scalars", run=run, tag="influence/time_total"
    )
    assert value == pytest.approx(result.diagnostics["time_total"], rel=1e-6)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_shows_our_image_panel(server: Server, tmp_path: Path) -> None:
    shot = tmp_path / "tensorboard.png"
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=1400,1100",
        "--force-device-scale-factor=2",
        "--virtual-time-budget=15000",
        f"--screenshot={shot}",
        f"{server.url}/#images",
    ]
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run(cmd, check=True, timeout=180, capture_output=True, env=env)
    if os.environ.get("TENSORBOARD_SCREENSHOT"):  # keep it, e.g. to look at it
        shutil.copy(shot, os.environ["TENSORBOARD_SCREENSHOT"])
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape == (2200, 2800, 3)
    assert img.std() > 20  # not a blank page

    def near(rgb: tuple[int, int, int], tol: int = 30) -> np.ndarray:
        return (np.abs(img - np.array(rgb)) <= tol).all(-1)

    # TensorBoard's orange header bar: the app itself rendered.
    assert near((245, 124, 0), 20)[:100].mean() > 0.5
    # Our panels: the green (helpful) and red (harmful) frames only come from our images, laid out
    # in several cards; the digits' black tiles too.
    for rgb in (HELPFUL_RGB, HARMFUL_RGB):
        ys, _ = np.nonzero(near(rgb))
        assert len(ys) > 2000, f"too few pixels of our frame colour {rgb}: {len(ys)}"
        assert ys.max() - ys.min() > 400  # more than one panel card
    assert near((0, 0, 0), 10)[200:].sum() > 20000
