"""Importing the package is cheap: Lightning, the loggers and matplotlib load only when used,
and every public name still imports from the top level."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

import lightning_influence
from lightning_influence import report

HEAVY = ("matplotlib", "wandb", "tensorboard", "lightning")


def _loaded_in_fresh_process(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_loads_no_logger_plotting_or_lightning() -> None:
    assert _loaded_in_fresh_process("import lightning_influence") == set()


def test_compute_influence_loads_no_logger_plotting_or_lightning() -> None:
    statement = "from lightning_influence import compute_influence, InfluenceConfig, LogSettings"
    assert _loaded_in_fresh_process(statement) == set()


def test_callback_brings_lightning() -> None:
    loaded = _loaded_in_fresh_process("from lightning_influence import InfluenceCallback")
    assert "lightning" in loaded


@pytest.mark.parametrize("name", lightning_influence.__all__)
def test_every_public_name_imports_from_the_top_level(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from lightning_influence import {name}", namespace)
    value = namespace[name]
    assert value is getattr(lightning_influence, name)
    if name != "__version__":
        assert getattr(value, "__name__", name) == name
        assert value.__module__.startswith("lightning_influence.")


def test_all_lists_every_lazy_name_once() -> None:
    assert sorted(lightning_influence.__all__) == sorted(
        ["__version__", *lightning_influence._SOURCES]
    )
    assert len(set(lightning_influence.__all__)) == len(lightning_influence.__all__)
    assert set(dir(lightning_influence)) >= set(lightning_influence.__all__)


def test_unknown_name_raises_attribute_error_naming_it() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        lightning_influence.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        exec("from lightning_influence import no_such_name", {})


def test_report_names_resolve_lazily() -> None:
    from lightning_influence.report.loggers import WRITERS, log_influence
    from lightning_influence.report.settings import LogSettings

    assert report.log_influence is log_influence
    assert report.LogSettings is LogSettings is lightning_influence.LogSettings
    assert report.WRITERS is WRITERS


def test_tensorboard_plugin_entry_point_loads() -> None:
    (point,) = [p for p in entry_points(group="tensorboard_plugins") if p.name == "influence"]
    plugin = point.load()
    assert plugin.__name__ == "InfluencePlugin"
    assert plugin.__module__ == "lightning_influence.report.plugin"
