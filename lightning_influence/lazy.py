"""Module attributes imported on first use (PEP 562), so importing a package stays cheap."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(module: str, sources: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports each name of ``sources`` from the module it maps to
    on first use and caches it in ``module``'s namespace.

    Example:
        >>> import types, sys
        >>> sys.modules["demo"] = types.ModuleType("demo")
        >>> lazy_attributes("demo", {"sqrt": "math"})("sqrt")(4.0)
        2.0
        >>> "sqrt" in vars(sys.modules["demo"])
        True
    """

    def __getattr__(name: str) -> Any:
        source = sources.get(name)
        if source is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(import_module(source), name)
        setattr(sys.modules[module], name, value)
        return value

    return __getattr__
