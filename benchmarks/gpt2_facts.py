"""``LiSSA()`` on Hugging Face's GPT-2, built from a config, on the planted-facts corpus.

The corpus of ``examples/planted_facts.py`` (``--facts`` facts, each stated in one training
sequence among ``--distractors`` others), a ``GPT2LMHeadModel`` from a ``GPT2Config`` (2 layers,
64 wide by default, no dropout; nothing downloaded) trained with Lightning, then
``compute_influence`` over all its parameters with ``LiSSA()`` at its defaults, one completion
query per fact. Prints the influence time in Lightning epochs (the training's seconds per epoch
in the same run), LiSSA's steps, and for how many of the facts the model answers the stating
sequence ranks first among the helpful ones. One intra-op thread. Needs ``transformers``
(never a package dependency: it is in ``requirements-peers.txt``, so run it with
``benchmarks/.venv-peers/bin/python``).

    python benchmarks/gpt2_facts.py                    # 24 facts, 400 distractors, 150 epochs
    python benchmarks/gpt2_facts.py --progress         # with the solver's progress bar

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from planted_facts import Corpus, PaddedSequences, answers, datasets, make_corpus, rank_of

from lightning_influence import LanguageModelingTask, LiSSA, compute_influence


class GPT2Logits(nn.Module):
    """``GPT2LMHeadModel`` from a config: ``forward(input_ids)`` gives the logits."""

    def __init__(self, vocab: int, length: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=vocab, n_positions=length, n_embd=width, n_layer=layers,
                            n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=None, eos_token_id=None)  # fmt: skip
        config._attn_implementation = "eager"
        self.gpt2 = GPT2LMHeadModel(config)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.gpt2(input_ids=input_ids, use_cache=False).logits  # type: ignore[no-any-return]


class LanguageModel(L.LightningModule):
    """Next-token cross-entropy, logits at ``t`` against the label at ``t + 1``."""

    def __init__(self, model: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)  # type: ignore[no-any-return]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"])[:, :-1]
        labels = batch["labels"][:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


@dataclass
class Trained:
    """The corpus, its padded datasets and the trained model, with the training's epoch time."""

    corpus: Corpus
    train: PaddedSequences
    queries: PaddedSequences
    module: LanguageModel
    epoch_s: float  # seconds per Lightning epoch, timed over the training

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The corpus, model and damping arguments (``build`` reads them)."""
    parser.add_argument("--facts", type=int, default=24)
    parser.add_argument("--distractors", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)


def build(args: argparse.Namespace, weights: Path | None = None) -> Trained:
    """The corpus and GPT-2 of ``args`` (see ``add_arguments``), trained with Lightning on one
    intra-op thread; the model is left in evaluation mode. With ``weights``: the trained weights
    and epoch time are loaded from that file when it exists, else saved there after training
    (several runs then score one model)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(1)
    L.seed_everything(args.seed, verbose=False)
    corpus = make_corpus(args.facts, args.distractors, args.seed)
    train, queries = datasets(corpus)
    length = train.batch["input_ids"].shape[1]
    model = GPT2Logits(len(corpus.vocab), length, args.width, args.layers, args.heads)
    module = LanguageModel(model)
    if weights is not None and weights.exists():
        saved = torch.load(weights)
        module.load_state_dict(saved["state_dict"])
        return Trained(corpus, train, queries, module.eval(), saved["epoch_s"])
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False)  # fmt: skip
    started = time.perf_counter()
    trainer.fit(module, DataLoader(train, batch_size=32, shuffle=True))
    epoch_s = (time.perf_counter() - started) / args.epochs
    module.eval()
    if weights is not None:
        torch.save({"state_dict": module.state_dict(), "epoch_s": epoch_s}, weights)
    return Trained(corpus, train, queries, module, epoch_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--progress", action="store_true", help="the solver's progress bar")
    args = parser.parse_args()
    built = build(args)
    corpus, train, queries, module = built.corpus, built.train, built.queries, built.module
    n_params, epoch_s, length = built.n_params, built.epoch_s, train.batch["input_ids"].shape[1]
    print(f"{n_params:,} parameters, {len(train)} sequences of {length} tokens; "
          f"{args.epochs} Lightning epochs, {epoch_s:.3f} s each", flush=True)  # fmt: skip

    correct = answers(module, corpus, queries)
    started = time.perf_counter()
    result = compute_influence(module, train, queries, task=LanguageModelingTask(),
                               solver=LiSSA(), damping=args.damping, self_influence=False,
                               progress=args.progress)  # fmt: skip
    influence_s = time.perf_counter() - started
    ranks = [rank_of(result.scores[:, j], corpus.stating[j], True)
             for j, ok in enumerate(correct) if ok]  # fmt: skip
    first = sum(r == 1 for r in ranks)
    d = result.diagnostics
    row = {"params": n_params, "sequences": len(train), "length": length,
           "epoch_s": round(epoch_s, 4), "influence_s": round(influence_s, 1),
           "epochs": round(influence_s / epoch_s),
           **{k: v for k, v in d.items() if k.startswith("solver_")},
           "answered": len(ranks), "facts": args.facts, "first": first,
           "first_share": round(first / max(len(ranks), 1), 3)}  # fmt: skip
    print(f"LiSSA() {influence_s:.1f} s = {influence_s / epoch_s:.0f} epochs, "
          f"{d.get('solver_steps')} steps; stating sequence first for {first} of the {len(ranks)} "
          f"facts answered ({args.facts} planted)")  # fmt: skip
    print(json.dumps(row))


if __name__ == "__main__":
    main()
