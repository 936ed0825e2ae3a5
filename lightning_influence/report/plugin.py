"""The Influence tab of TensorBoard: a dynamic plugin that serves the dashboard files.

TensorBoard finds it through the ``tensorboard_plugins`` entry point (installed with the package).
It looks below ``--logdir`` for the folders :mod:`.dashboard` writes (``*_dashboard/index.json``),
serves their index and pictures as they are (JSON and PNG: nothing is unpickled) and a plain
JavaScript page, ``static/index.js``, that draws them. No frontend build is involved.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from lightning_influence.report.dashboard import FORMAT, INDEX

__all__ = ["InfluencePlugin", "find_dashboards"]

_PICTURE = re.compile(r"^[A-Za-z0-9_.-]+\.png$")
_STATIC = Path(__file__).with_name("static")


def find_dashboards(logdir: str | Path) -> dict[str, Path]:
    """Dashboard folders below ``logdir`` by run name: the path of the folder that holds them,
    relative to ``logdir`` (``digits/version_0/influence``), with ``:<stem>`` when the tag prefix
    is not ``influence``.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "a" / "influence" / "influence_dashboard").mkdir(parents=True)
        >>> _ = (root / "a" / "influence" / "influence_dashboard" / "index.json").write_text(
        ...     '{"format": "lightning-influence-dashboard", "version": 1}')
        >>> list(find_dashboards(root)), find_dashboards("")
        (['a/influence'], {})
    """
    found: dict[str, Path] = {}
    if not str(logdir) or not Path(logdir).is_dir():  # "" (several --logdir_spec folders): none
        return found
    root = Path(logdir)
    for parent, dirs, files in os.walk(root):
        dirs.sort()
        if INDEX not in files or not parent.endswith("_dashboard"):
            continue
        folder = Path(parent)
        if _format(folder / INDEX) != FORMAT:
            continue
        stem = folder.name.removesuffix("_dashboard")
        name = folder.parent.relative_to(root).as_posix()
        found[name if stem == "influence" else f"{name}:{stem}"] = folder
    return found


def _format(path: Path) -> str | None:
    """The ``format`` field of an index file (read as JSON, never unpickled), or ``None``."""
    try:
        with path.open() as f:
            head = json.load(f)
    except (OSError, ValueError):
        return None
    return head.get("format") if isinstance(head, dict) else None


class InfluencePlugin(base_plugin.TBPlugin):
    """The "Influence" tab: validation examples with their most helpful and harmful training
    examples (ranked by relative score, or raw), and the self-influence review, for every run
    below the log folder."""

    plugin_name = "influence"

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._logdir = context.logdir or ""
        self._runs: dict[str, Path] = {}  # refreshed by /runs, and when a run is not found

    def get_plugin_apps(self) -> dict[str, Any]:
        serve = wrappers.Request.application
        return {
            "/index.js": serve(self._serve_script),
            "/runs": serve(self._serve_runs),
            "/index": serve(self._serve_index),
            "/picture": serve(self._serve_picture),
        }

    def is_active(self) -> bool:
        self._runs = find_dashboards(self._logdir)
        return bool(self._runs)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Influence")

    def _folder(self, request: wrappers.Request) -> Path | None:
        run = request.args.get("run", "")
        if run not in self._runs:
            self._runs = find_dashboards(self._logdir)
        return self._runs.get(run)

    def _serve_script(self, request: wrappers.Request) -> wrappers.Response:
        script = (_STATIC / "index.js").read_text()
        return http_util.Respond(request, script, "application/javascript")

    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        self._runs = find_dashboards(self._logdir)
        return http_util.Respond(request, list(self._runs), "application/json")

    def _serve_index(self, request: wrappers.Request) -> wrappers.Response:
        folder = self._folder(request)
        if folder is None or not (folder / INDEX).is_file():
            return http_util.Respond(request, "no such run", "text/plain", code=404)
        return http_util.Respond(request, (folder / INDEX).read_text(), "application/json")

    def _serve_picture(self, request: wrappers.Request) -> wrappers.Response:
        folder, name = self._folder(request), request.args.get("name", "")
        if folder is None or not _PICTURE.match(name) or not (folder / name).is_file():
            return http_util.Respond(request, "no such picture", "text/plain", code=404)
        return http_util.Respond(request, (folder / name).read_bytes(), "image/png")
