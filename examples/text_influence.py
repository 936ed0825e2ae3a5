"""Train a small text classifier on a corpus this script generates, with ``InfluenceCallback``.

Sentences about three topics (sport, weather, cooking) are written from small vocabularies, 8% of
the training labels are flipped, and a bag-of-embeddings model learns the topic. When training
ends the callback finds, for each validation sentence, the training sentences that helped and
harmed it, and ranks the training sentences by self-influence (flipped labels rank high). The
examples are shown as text: ``LogSettings(kind="text", describe=corpus.decode)`` turns token ids
back into words, in TensorBoard's Influence and Text tabs and in W&B tables.

    python examples/text_influence.py               # about 20 s on one CPU thread
    tensorboard --logdir runs                       # then open the Influence tab
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import InfluenceCallback, InfluenceResult
from lightning_influence.report import LogSettings

TOPICS = {
    "sport": "match goal team coach striker referee season league keeper penalty stadium fans",
    "weather": "rain wind storm sunny cloud forecast snow thunder humid breeze frost drizzle",
    "cooking": "oven recipe garlic butter simmer onion flour sauce pepper roast dough spice",
}
FILLER = "the a today this was very so and then again quite really after before"


@dataclass
class Corpus:
    """Generated sentences as padded token ids (0 = padding), their topic labels, and the words."""

    ids: Tensor  # [n, length] long
    labels: Tensor  # [n] long, flipped where ``flipped`` says so
    clean_labels: Tensor
    flipped: Tensor  # [k] indices of the flipped training labels
    vocab: list[str]

    def decode(self, ids: Tensor) -> str:
        """Token ids back to words, padding dropped.

        Example:
            >>> corpus = make_corpus(10, seed=0)
            >>> corpus.decode(torch.tensor([1, 2, 0, 0]))
            'the a'
        """
        return " ".join(self.vocab[i] for i in ids.tolist() if i)


def make_corpus(n: int, seed: int, length: int = 10, flip_fraction: float = 0.0) -> Corpus:
    """``n`` sentences of 5 to ``length`` words, about a third of each topic."""
    rng = random.Random(seed)
    topics = [words.split() for words in TOPICS.values()]
    filler = FILLER.split()
    vocab = ["<pad>", *filler, *(w for words in topics for w in words)]
    token = {w: i for i, w in enumerate(vocab)}
    ids = torch.zeros(n, length, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    for row in range(n):
        label = rng.randrange(len(topics))
        size = rng.randint(5, length)
        n_topic = rng.randint(2, max(2, size // 2))
        words = rng.sample(topics[label], n_topic)
        words += [rng.choice(filler) for _ in range(size - n_topic)]
        if rng.random() < 0.3:  # a word from another topic: harder sentences
            words[-1] = rng.choice(topics[(label + 1) % len(topics)])
        rng.shuffle(words)
        ids[row, :size] = torch.tensor([token[w] for w in words])
        labels[row] = label
    clean = labels.clone()
    flipped = torch.tensor(sorted(rng.sample(range(n), round(flip_fraction * n))), dtype=torch.long)
    for i in flipped.tolist():
        labels[i] = (int(labels[i]) + rng.randrange(1, len(topics))) % len(topics)
    return Corpus(ids, labels, clean, flipped, vocab)


class TextClassifier(L.LightningModule):
    """Mean of word embeddings (padding left out), then a linear layer over the topics."""

    def __init__(self, vocab_size: int, n_classes: int = 3, dim: int = 16, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, ids: Tensor) -> Tensor:
        mask = (ids != 0).unsqueeze(-1).float()
        mean = (self.embed(ids) * mask).sum(-2) / mask.sum(-2).clamp_min(1.0)
        return self.head(mean)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        ids, labels = batch
        loss = nn.functional.cross_entropy(self(ids), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        ids, labels = batch
        self.log("val_acc", (self(ids).argmax(-1) == labels).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=1e-3)


class TextDataModule(L.LightningDataModule):
    """Generated training sentences (some labels flipped) and clean validation sentences."""

    def __init__(self, n_train: int = 400, n_val: int = 100, flip: float = 0.08, seed: int = 0):
        super().__init__()
        self.train = make_corpus(n_train, seed, flip_fraction=flip)
        val = make_corpus(n_val, seed + 1)
        self.train_dataset = TensorDataset(self.train.ids, self.train.labels)
        self.val_dataset = TensorDataset(val.ids, val.labels)

    def train_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(self.train_dataset, batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(self.val_dataset, batch_size=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    parser.add_argument("--num-val", type=int, default=48, help="validation sentences to explain")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="TensorBoard root folder")
    parser.add_argument("--name", default="text_influence", help="experiment name in --runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars, short summary")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> InfluenceResult:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.quiet:
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore")
    L.seed_everything(args.seed, verbose=not args.quiet)
    data = TextDataModule(seed=args.seed)
    model = TextClassifier(len(data.train.vocab))
    influence = InfluenceCallback(
        num_val=args.num_val,
        damping=1e-3,  # the optimizer's weight decay
        perturbation_k=0,  # input-space maps need continuous inputs, not token ids
        log=LogSettings(
            kind="text", describe=data.train.decode, class_names=tuple(TOPICS), top_k=6, n_val=4
        ),
    )
    logger = TensorBoardLogger(args.runs, name=args.name)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[influence],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.quiet,
        log_every_n_steps=5,
    )
    trainer.fit(model, data)
    result = influence.result
    if result is None:
        raise RuntimeError("the influence callback produced no result")
    flipped = set(data.train.flipped.tolist())
    top = result.outliers(len(flipped)).indices.tolist()
    found = len(flipped & set(top))
    print(f"\nFlipped training labels among the top {len(top)} by self-influence: {found}.")
    v = int(result.val_indices[0])
    print(f"Validation sentence #{v}: {data.train.decode(data.val_dataset.tensors[0][v])!r}")
    for i in result.helpful(3).indices[0].tolist():
        print(f"  helped by #{i}: {data.train.decode(data.train.ids[i])!r}")
    runs = Path(args.runs).resolve()
    print(f"\nOpen the Influence tab: {sys.executable} -m tensorboard.main --logdir {runs}")
    return result


if __name__ == "__main__":
    main()
