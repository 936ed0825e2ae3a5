"""Every Markdown code block marked ``<!-- runnable -->`` in README.md and docs/ runs as written.

A marked block is executed in a fresh namespace, in a temporary folder, with a few names the docs
take as given: ``model`` (a small classifier whose last layer is ``classifier``), the training
and validation datasets under the names the pages use (``train_dataset`` / ``val_dataset``,
``train_data`` / ``val_data``, ``train`` / ``val``). Imports must be in the block.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- runnable -->"
BLOCK = re.compile(r"^" + re.escape(MARKER) + r"\n```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[str, str]]:
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 2
            found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1)))
    return found


BLOCKS = _blocks()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def _given() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 4, generator=gen), torch.randint(0, 3, (48,), generator=gen)
    train, val = TensorDataset(x[:36], y[:36]), TensorDataset(x[36:], y[36:])
    names = ("train_dataset", "train_data", "train"), ("val_dataset", "val_data", "val")
    return {"model": _Net(), **dict.fromkeys(names[0], train), **dict.fromkeys(names[1], val)}


def test_the_docs_have_runnable_blocks() -> None:
    pages = {name.split(":")[0] for name, _ in BLOCKS}
    assert {"docs/getting-started.md", "docs/callback.md"} <= pages, pages


@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_runnable_block(
    where: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__", **_given()}
    exec(compile(code, where, "exec"), namespace)  # raises where the docs are wrong
