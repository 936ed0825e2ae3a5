"""What TensorBoard really shows: a TensorBoard server on 127.0.0.1 over two runs written as the
callback writes them (digits pictures, and generated sentences shown as text), its data endpoints,
our Influence tab served by the plugin, and headless Chromium rendering that tab and the images
page. Screenshots land in the test's tmp folder (and in ``$INFLUENCE_SCREENSHOTS`` when set)."""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from lm_case import Facts, facts_case
from PIL import Image
from report_case import (
    HARMFUL_RGB,
    HELPFUL_RGB,
    N_OUT,
    N_VAL,
    TOP_K,
    Digits,
    Text,
    colour_pixels,
    digits_case,
    table_case,
    tensorboard_events,
    text_case,
)

from lightning_influence import InfluenceResult

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)
DIGITS_RUN, TABLE_RUN, TEXT_RUN = "digits/version_0", "table/version_0", "text/version_0"


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

    def status(self, path: str, **params: str) -> int:
        try:
            self.get(path, **params)
        except urllib.error.HTTPError as error:
            return error.code
        return 200

    def json(self, path: str, **params: str) -> Any:
        return json.loads(self.get(path, **params))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Digits, Text, Path]:
    """Three runs (pictures, tables, text) as the callback leaves them: events, and
    ``<log_dir>/influence/`` with the result file and the dashboard beside it."""
    digits, text = digits_case(), text_case()
    root = tmp_path_factory.mktemp("tb")
    for case, name in ((digits, "digits"), (table_case(), "table"), (text, "text")):
        logger = TensorBoardLogger(root, name=name)
        out = Path(logger.log_dir) / "influence"
        saved = case.result.save(out / "influence.pt")
        case.log([logger], out, result_path=saved)
    return digits, text, root


@pytest.fixture(scope="module")
def server(logged: tuple[Digits, Text, Path]) -> Iterator[Server]:
    server = Server(logged[2])
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


def chromium(url: str, tmp_path: Path, screenshot: Path | None = None) -> str:
    """The page at ``url`` rendered by headless Chromium: its DOM, or a screenshot."""
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM,
        *("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"),
        *("--disable-quic", "--no-first-run", "--disable-background-networking"),
        *("--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chr'}"),
        "--virtual-time-budget=15000",
        *(("--window-size=1400,1100", "--force-device-scale-factor=2") if screenshot else ()),
        f"--screenshot={screenshot}" if screenshot else "--dump-dom",
        url,
    ]
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run(cmd, check=True, timeout=180, capture_output=True, env=env, text=True)
    if screenshot is not None and os.environ.get("INFLUENCE_SCREENSHOTS"):
        keep = Path(os.environ["INFLUENCE_SCREENSHOTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, keep / screenshot.name)
    return done.stdout


def html_rows(page: str) -> list[list[str]]:
    """Cells of each body row of the HTML tables."""
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in rows]
    return [[c.strip() for c in row] for row in cells if row]


def run_panels(dom: str) -> dict[str, str]:
    """The rendered panel of each run in the Influence tab, by run name."""
    parts = re.split(r'<div class="run" data-run="([^"]+)"', dom)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def cards(panel: str, kind: str) -> list[tuple[int, int, float, str]]:
    """(rank, training index, score, text) of the helpful or harmful cards of a panel."""
    return [(r, i, s, t) for r, i, s, _, t in scored_cards(panel, kind)]


def scored_cards(panel: str, kind: str) -> list[tuple[int, int, float, float | None, str]]:
    """(rank, training index, score, relative score, text) of the helpful or harmful cards."""
    found = re.findall(
        rf'<div class="card {kind}" data-kind="{kind}" data-rank="(\d+)" data-index="(\d+)" '
        r'data-score="([^"]+)"(?: data-relative="([^"]+)")?>(.*?)</div></div>',
        panel,
        re.S,
    )
    return [
        (int(r), int(i), float(s), float(v) if v else None, html.unescape(t))
        for r, i, s, v, t in found
    ]


# --------------------------------------------------------------------------------------------
# The standard tabs
# --------------------------------------------------------------------------------------------


def test_server_endpoints_serve_our_text_images_histograms(
    logged: tuple[Digits, Text, Path], server: Server
) -> None:
    digits, _, root = logged
    result = digits.result
    assert server.json("/data/runs") == [DIGITS_RUN, TABLE_RUN, TEXT_RUN]
    run = DIGITS_RUN
    val_ids = result.val_indices[:N_VAL].tolist()

    text_tags = set(server.json("/data/plugin/text/tags")[run])
    wanted = [f"influence/val_{i}" for i in val_ids] + ["influence/outliers", "influence/summary"]
    assert {f"{t}/text_summary" for t in wanted} <= text_tags
    (entry,) = server.json("/data/plugin/text/text", run=run, tag="influence/outliers/text_summary")
    page = entry["text"]  # markdown rendered to HTML by the server
    assert "<table>" in page
    assert [int(r[1]) for r in html_rows(page)] == result.outliers(N_OUT).indices.tolist()
    tag = f"influence/val_{val_ids[0]}/text_summary"
    (entry,) = server.json("/data/plugin/text/text", run=run, tag=tag)
    rows = html_rows(entry["text"])  # the relative ranking's table, then the raw one's
    for ranking, part in ((True, rows[: 2 * TOP_K]), (False, rows[2 * TOP_K :])):
        helpful, harmful = (
            getattr(result, kind)(TOP_K, relative=ranking).indices[0].tolist()
            for kind in ("helpful", "harmful")
        )
        assert [int(r[2]) for r in part if r[0] == "helpful"] == helpful
        assert [int(r[2]) for r in part if r[0] == "harmful"] == harmful
    assert "A training example with a wrong label can still be helpful" in entry["text"]

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
    tag = "influence/log10_self_influence"
    ((_, _, buckets),) = server.json("/data/plugin/histograms/histograms", run=run, tag=tag)
    lows = [b[0] for b in buckets if b[2] > 0]  # log scale: decades, not 0 .. 180,000
    assert min(lows) > -3 and max(b[1] for b in buckets) < 5


def test_scalars_tab_holds_no_single_point_charts(
    logged: tuple[Digits, Text, Path], server: Server
) -> None:
    result = logged[0].result
    tags = server.json("/data/plugin/scalars/tags")
    single = [
        (run, tag)
        for run, run_tags in tags.items()
        for tag in run_tags
        if len(server.json("/data/plugin/scalars/scalars", run=run, tag=tag)) < 2
    ]
    assert single == []
    assert not any(tag.startswith("influence/") for t in tags.values() for tag in t)
    # the diagnostics are in one text summary instead, each with its value
    (entry,) = server.json(
        "/data/plugin/text/text", run=DIGITS_RUN, tag="influence/summary/text_summary"
    )
    values = {r[0]: float(r[1]) for r in html_rows(entry["text"])}
    for key, value in result.diagnostics.items():
        assert values[key] == pytest.approx(value, rel=1e-3)


@needs_chromium
def test_chromium_shows_our_image_panel(server: Server, tmp_path: Path) -> None:
    shot = tmp_path / "tensorboard_images.png"
    chromium(f"{server.url}/#images", tmp_path, shot)
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


# --------------------------------------------------------------------------------------------
# The Influence tab
# --------------------------------------------------------------------------------------------


def test_plugin_serves_the_dashboard_files_and_nothing_else(
    logged: tuple[Digits, Text, Path], server: Server
) -> None:
    root = logged[2]
    listing = server.json("/data/plugins_listing")["influence"]
    assert listing["enabled"] and listing["tab_name"] == "Influence"
    runs = [f"{run}/influence" for run in (DIGITS_RUN, TABLE_RUN, TEXT_RUN)]
    assert server.json("/data/plugin/influence/runs") == runs
    folder = root / runs[0] / "influence_dashboard"
    served = server.json("/data/plugin/influence/index", run=runs[0])
    assert served == json.loads((folder / "index.json").read_text())
    name = served["validation"][0]["helpful"][0]["image"]
    png = server.get("/data/plugin/influence/picture", run=runs[0], name=name)
    assert png == (folder / name).read_bytes()
    for params in (
        {"run": runs[0], "name": "../influence.pt"},
        {"run": runs[0], "name": "index.json"},
        {"run": "digits", "name": name},
    ):
        assert server.status("/data/plugin/influence/picture", **params) == 404
    assert server.status("/data/plugin/influence/index", run="../..") == 404


@needs_chromium
def test_influence_tab_shows_the_result_file(
    logged: tuple[Digits, Text, Path], server: Server, tmp_path: Path
) -> None:
    digits, text, root = logged
    url = f"{server.url}/data/plugin_entry.html?name=influence"
    panels = run_panels(chromium(url, tmp_path))
    table = table_case()
    assert list(panels) == [f"{run}/influence" for run in (DIGITS_RUN, TABLE_RUN, TEXT_RUN)]
    cases = (digits, table, text)  # side by side, the same validation example in each
    for (run, panel), case, k in zip(panels.items(), cases, (TOP_K, 3, 3), strict=True):
        result = InfluenceResult.load(root / run / "influence.pt")
        assert result.equals(case.result)
        shown = int(re.match(r' data-val="(\d+)"', panel).group(1))  # type: ignore[union-attr]
        assert shown == int(digits.result.val_indices.min())  # first by index, in both runs
        assert f"Validation example {shown}" in panel
        # the relative ranking by default, each card with its raw score too
        check_cards(panel, result, shown, k, relative=True)
    # the text run shows its sentences, decoded, with the topics' names
    ids = text.dm.train_dataset.tensors[0]
    for _, i, _, body in cards(panels[f"{TEXT_RUN}/influence"], "helpful"):
        assert text.dm.train.decode(ids[i]) in body
        assert re.search(r"label <span[^>]*>(sport|weather|cooking)</span>", body)
    # the table run shows each example's named values
    x = table.dm.train_dataset.tensors[0]
    for _, i, _, body in cards(panels[f"{TABLE_RUN}/influence"], "harmful"):
        cells = re.findall(r'<td class="text">(\w+)</td><td>([^<]+)</td>', body)
        assert [n for n, _ in cells] == list(table.names)
        np.testing.assert_allclose([float(v) for _, v in cells], x[i], rtol=1e-3, atol=1e-4)
    # pictures at a readable size: the digits run's cards hold its PNGs
    assert (
        'src="picture?run=digits%2Fversion_0%2Finfluence&amp;name=train_'
        in panels[f"{DIGITS_RUN}/influence"]
    )
    for view in ("validation", "review"):
        shot = tmp_path / f"influence_tab_{view}.png"
        chromium(f"{url}#{view}", tmp_path, shot)
        img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
        assert img.shape == (2200, 2800, 3) and img.std() > 20


def check_cards(
    panel: str, result: InfluenceResult, val_index: int, k: int, relative: bool
) -> None:
    """The panel's cards are the relative (or raw) ranking of ``val_index``, with both scores."""
    relative_scores = result.relative_scores[:, result.val_indices == val_index][:, 0]
    row = {int(i): n for n, i in enumerate(result.train_indices)}
    column = int((result.val_indices == val_index).nonzero()[0, 0])
    for kind in ("helpful", "harmful"):
        ranking = getattr(result, kind)(k, val_index=val_index, relative=relative)
        got = scored_cards(panel, kind)
        assert [(r, i) for r, i, *_ in got] == list(enumerate(ranking.indices[0].tolist(), 1))
        raw = [float(result.scores[row[i], column]) for _, i, *_ in got]
        np.testing.assert_allclose([s for _, _, s, _, _ in got], raw, rtol=1e-6)
        wanted = [float(relative_scores[row[i]]) for _, i, *_ in got]
        np.testing.assert_allclose([v for _, _, _, v, _ in got], wanted, rtol=1e-6)
        for _, i, s, v, body in got:  # the numbers as printed, at their precision
            assert f"#{i}" in body
            for label, value, rtol in (
                ("score", s, 1e-3),
                ("relative", v, 1e-3),
                ("if removed: loss", -s / result.n_train, 1e-2),
            ):
                printed = re.search(rf"{label} ([-+0-9.e]+)", body)
                assert printed is not None, (label, body)
                assert float(printed.group(1)) == pytest.approx(value, rel=rtol)


class DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    JSON messages ending in a NUL byte, read by Chromium from its fd 3, written to its fd 4), so
    a test can click in the page and read the DOM that follows."""

    def __init__(self, tmp_path: Path) -> None:
        assert CHROMIUM is not None
        to_browser, self._send = os.pipe()
        self._receive, from_browser = os.pipe()

        def on_fds_3_and_4() -> None:  # in the child, before exec
            read, write = os.dup(to_browser), os.dup(from_browser)
            os.dup2(read, 3)
            os.dup2(write, 4)

        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                *("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"),
                *("--disable-quic", "--no-first-run", "--disable-background-networking"),
                *("--disable-component-update", "--disable-sync"),
                *(f"--user-data-dir={tmp_path / 'chr'}", "--remote-debugging-pipe"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=on_fds_3_and_4,
            env={**os.environ, "HOME": str(tmp_path)},
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._id = 0
        self.session = ""

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._send, json.dumps(message).encode() + b"\0")
        while True:  # skip events and other replies
            while b"\0" not in self._buffer:
                chunk = os.read(self._receive, 1 << 16)
                assert chunk, "chromium closed its DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            assert time.monotonic() < deadline, f"waited {timeout} s for {expression}"
            time.sleep(0.2)

    def dom(self) -> str:
        return str(self.evaluate("document.documentElement.outerHTML"))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        os.close(self._send)
        os.close(self._receive)


@needs_chromium
def test_influence_tab_switches_between_relative_and_raw_rankings(
    logged: tuple[Digits, Text, Path], server: Server, tmp_path: Path
) -> None:
    digits = logged[0]
    result = digits.result
    shown = int(result.val_indices.min())  # the first validation example by index
    browser = DevTools(tmp_path)
    try:
        browser.open(f"{server.url}/data/plugin_entry.html?name=influence")
        switch = "document.querySelector('.ranking-switch')"
        browser.wait_for(f"{switch} && {switch}.dataset.ranking === 'relative'")
        for ranking in ("raw", "relative"):  # a real click on each button in turn
            before = browser.dom()
            browser.evaluate(f"{switch}.querySelector('button[data-ranking={ranking}]').click()")
            browser.wait_for(f"{switch}.dataset.ranking === '{ranking}'")
            dom = browser.dom()
            panel = run_panels(dom)[f"{DIGITS_RUN}/influence"]
            check_cards(panel, result, shown, TOP_K, relative=ranking == "relative")
            on = re.findall(r'<button class="view ranking on" data-ranking="(\w+)"', dom)
            assert on == [ranking]
            assert f"Most helpful training examples by {ranking} score" in panel
            note = (
                "Relative: ranked by score / √self-influence"
                if ranking == "relative"
                else ("Raw: ranked by score, the predicted effect of up-weighting")
            )
            assert note in dom and note not in before
    finally:
        browser.close()


@needs_chromium
def test_influence_tab_review_pages_the_self_influence_ranking(
    logged: tuple[Digits, Text, Path], server: Server, tmp_path: Path
) -> None:
    digits = logged[0]
    dom = chromium(f"{server.url}/data/plugin_entry.html?name=influence#review", tmp_path)
    panel = run_panels(dom)[f"{DIGITS_RUN}/influence"]
    shown = [int(i) for i in re.findall(r'<tr class="review" data-index="(\d+)"', panel)]
    assert shown == digits.result.outliers(20).indices.tolist()  # the first page of 20
    assert "page 1 of 7" in panel  # 128 ranked (dashboard_size) / 20
    assert "checked 0 of 300 training examples (0.0%)" in panel
    assert "download CSV" in panel
    median = float(digits.result.self_influence.median())
    times = [float(x.replace(",", "")) for x in re.findall(r"<td>([0-9.,]+)x</td>", panel)]
    np.testing.assert_allclose(times, digits.result.outliers(20).scores / median, rtol=5e-3)


# --------------------------------------------------------------------------------------------
# A language model: the tokens that carry each shown sequence's score
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def facts_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Facts, Server]]:
    """One run of the planted-facts case, logged as the callback logs it, served on its own."""
    case, root = facts_case(), tmp_path_factory.mktemp("facts")
    logger = TensorBoardLogger(root, name="facts")
    out = Path(logger.log_dir) / "influence"
    case.log([logger], out, result_path=case.result.save(out / "influence.pt"))
    server = Server(root)
    try:
        yield case, server
    finally:
        server.close()


@needs_chromium
def test_influence_tab_highlights_the_tokens_that_carry_the_score(
    facts_server: tuple[Facts, Server], tmp_path: Path
) -> None:
    case, server = facts_server
    result, corpus = case.result, case.corpus
    url = f"{server.url}/data/plugin_entry.html?name=influence"
    (panel,) = run_panels(chromium(url, tmp_path)).values()
    val = int(result.val_indices.min())
    assert f"Validation example {val}" in panel and "tinted by their share" in panel
    row = {int(i): n for n, i in enumerate(result.train_indices)}
    column = int((result.val_indices == val).nonzero()[0, 0])
    for kind in ("helpful", "harmful"):
        got = cards(panel, kind)
        assert got
        for _, i, _, body in got:
            spans = re.findall(r'<span class="tok" data-share="([^"]+)"[^>]*>([^<]*)</span>', body)
            expected = result.token_shares_of(i, val_index=val)
            assert expected is not None
            expected = expected[~expected.isnan()]
            np.testing.assert_allclose([float(s) for s, _ in spans], expected, rtol=1e-6)
            assert sum(float(s) for s, _ in spans) == pytest.approx(
                float(result.scores[row[i], column]), rel=1e-6
            )
            text = html.unescape(re.sub(r"<[^>]+>", "", body.split('<div class="meta">')[0]))
            assert text == corpus.decode(case.dm.train_dataset[i]["input_ids"].tolist())
    # the sequence that states the fact helps most, and its answer carries the largest share
    (_, first, _, body), *_ = cards(panel, "helpful")
    assert first == corpus.stating[val]  # queries are in fact order
    spans = re.findall(r'<span class="tok" data-share="([^"]+)"[^>]*>([^<]*)</span>', body)
    assert min(spans, key=lambda s: float(s[0]))[1].strip() == corpus.vocab[corpus.facts[val][1]]
    shot = tmp_path / "influence_tab_tokens.png"
    chromium(url, tmp_path, shot)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the answer's tint: the helpful green at 0.8 over the snippet's #f7f7f7 (not a card's frame)
    assert colour_pixels(img, (77, 161, 77), tol=4).sum() > 50
