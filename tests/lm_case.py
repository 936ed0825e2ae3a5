"""A language-model result for the report tests: planted facts on a small causal transformer,
with the per-token shares of the shown sequences' scores."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from planted_facts import CausalTransformer, datasets, make_corpus
from report_case import Case

from lightning_influence import LanguageModelingTask
from lightning_influence.report import LogSettings, log_influence


class Facts(Case):
    """4 planted facts among 12 distractor sequences; influence on the output layer."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        corpus = make_corpus(4, 12, seed=0)
        train, queries = datasets(corpus)
        length = train.batch["input_ids"].shape[1]
        model = CausalTransformer(len(corpus.vocab), length, width=16, layers=1, heads=2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        ids, labels = train.batch["input_ids"], train.batch["labels"]
        for _ in range(150):
            logits = model(ids)[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.corpus, self.task = corpus, LanguageModelingTask(decode=corpus.decode)
        dm = SimpleNamespace(train_dataset=train, val_dataset=queries)
        settings = LogSettings(n_val=2, top_k=3, n_outliers=3, kind="text")
        super().__init__(
            dm,
            model.eval(),
            settings,
            task=self.task,
            parameters=["head.weight"],
            token_k=3,
            dtype=torch.float64,
        )

    def log(self, loggers: list[Any], out: Path, **kwargs: Any) -> list[Path]:
        """``log_influence`` of the result with the language-model task."""
        settings = kwargs.pop("settings", self.settings)
        train, val = self.dm.train_dataset, self.dm.val_dataset
        return log_influence(self.result, loggers, train, val, self.task, out, settings, **kwargs)


@functools.cache
def facts_case() -> Facts:
    """Computed once per session (nothing mutates it)."""
    torch.set_num_threads(1)
    return Facts()
