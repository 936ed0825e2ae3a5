"""Which training sequence taught a language model this fact? A check with a known answer.

The script writes a small corpus with planted facts, "the capital of X is Y ." for invented names,
each stated in exactly one training sequence among many distractor sequences (some of which reuse
the same names in other sentences), trains a small causal transformer (PyTorch's own
``nn.TransformerEncoder`` with a causal mask) from scratch with Lightning, and asks for each fact
the completion "the capital of X is" -> "Y". Influence (``compute_influence`` with completion
queries, CG on the output layer's weights in float64) should rank the sequence that states the
fact first among the helpful ones; a plain gradient dot product is scored beside it. Within
that sequence, the per-token shares of its score (``token_k``) should put the largest share on
the answer, the capital's token. Nothing is downloaded.

    python examples/planted_facts.py               # about 3 minutes on one CPU thread
    python examples/planted_facts.py --facts 12 --distractors 108 --epochs 100   # 30 s
    python examples/planted_facts.py --report facts_report   # also CSV tables with the text
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_influence import (
    CG,
    FunctionalModel,
    LanguageModelingTask,
    completion_example,
    compute_influence,
)
from lightning_influence.core.gradients import per_sample_gradients
from lightning_influence.core.sequence import IGNORE_INDEX, pad_sequences
from lightning_influence.report import LogSettings, log_influence

PAD = "<pad>"
_NOUNS = {
    "land": ["hills", "rivers", "farms", "lakes", "forests"],
    "place": ["market", "bridge", "harbor", "temple", "tower"],
    "food": ["tea", "music", "fish", "bread", "rice"],
}


# ----------------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    """Token ids of the training sequences and the facts, with the vocabulary to decode them."""

    vocab: list[str]
    sequences: list[list[int]]
    facts: list[tuple[int, int]]  # (country token, city token)
    stating: list[int]  # index of the training sequence that states each fact
    shared_names: list[bool]  # whether a fact's names also appear in distractor sequences

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if self.vocab[i] != PAD)

    def prompt(self, fact: int) -> list[int]:
        country, _ = self.facts[fact]
        return [self.vocab.index(w) for w in ("the", "capital", "of")] + [
            country,
            self.vocab.index("is"),
        ]


def _names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "n", "r", "s", "l", "k"]
    out: list[str] = []
    while len(out) < count:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(2))
        word += rng.choice(codas)
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


def make_corpus(n_facts: int = 40, n_distractors: int = 360, seed: int = 0) -> Corpus:
    """Facts stated once each, two to three sentences per sequence, names reused by distractors."""
    rng = random.Random(seed)
    taken: set[str] = set()
    countries = _names(rng, n_facts + n_facts // 2, taken)
    cities = _names(rng, 2 * n_facts, taken)
    people = _names(rng, n_facts, taken)
    fact_pairs = list(zip(countries[:n_facts], cities[:n_facts], strict=True))
    # Distractors reuse the names of the first half of the facts, never those of the second half.
    half = n_facts // 2
    reused_countries, reused_cities = (
        countries[:half] + countries[n_facts:],
        cities[:half] + cities[n_facts:],
    )

    def distractor_sentence() -> list[str]:
        c, p = rng.choice(reused_countries), rng.choice(people)
        y, y2 = rng.choice(reused_cities), rng.choice(reused_cities)
        kind = rng.randrange(6)
        if kind == 0:
            return [c, "is", "a", "land", "of", rng.choice(_NOUNS["land"]), "."]
        if kind == 1:
            return [p, "lives", "in", y, "."]
        if kind == 2:
            return [p, "was", "born", "in", c, "."]
        if kind == 3:
            return [y, "has", "a", "large", rng.choice(_NOUNS["place"]), "."]
        if kind == 4:
            return ["the", "people", "of", c, "like", rng.choice(_NOUNS["food"]), "."]
        return [p, "traveled", "from", y, "to", y2, "."]

    texts: list[list[str]] = []
    stating = rng.sample(range(n_facts + n_distractors), n_facts)
    fact_at = dict(zip(stating, range(n_facts), strict=True))
    for i in range(n_facts + n_distractors):
        sentences = [distractor_sentence() for _ in range(rng.randint(2, 3))]
        if i in fact_at:
            c, y = fact_pairs[fact_at[i]]
            # First, so that the query finds the fact at the positions the model learned it at.
            sentences[0] = ["the", "capital", "of", c, "is", y, "."]
        texts.append([w for s in sentences for w in s])
    words = sorted({w for t in texts for w in t} | {"the", "capital", "of", "is"})
    vocab = [PAD, *words]
    ids = {w: i for i, w in enumerate(vocab)}
    sequences = [[ids[w] for w in t] for t in texts]
    seen_elsewhere = {w for i, t in enumerate(texts) if i not in fact_at for w in t}
    return Corpus(
        vocab=vocab,
        sequences=sequences,
        facts=[(ids[c], ids[y]) for c, y in fact_pairs],
        stating=stating,
        shared_names=[c in seen_elsewhere or y in seen_elsewhere for c, y in fact_pairs],
    )


class PaddedSequences(Dataset[dict[str, Tensor]]):
    """Examples padded to one length (``input_ids``, ``attention_mask``, ``labels``)."""

    def __init__(self, examples: list[dict[str, Tensor]], length: int) -> None:
        self.batch = pad_sequences(examples)
        pad = length - self.batch["input_ids"].shape[1]
        self.batch["input_ids"] = F.pad(self.batch["input_ids"], (0, pad), value=0)
        self.batch["attention_mask"] = F.pad(self.batch["attention_mask"], (0, pad), value=0)
        self.batch["labels"] = F.pad(self.batch["labels"], (0, pad), value=IGNORE_INDEX)

    def __len__(self) -> int:
        return int(self.batch["input_ids"].shape[0])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


# ----------------------------------------------------------------------------------- model
def datasets(corpus: Corpus) -> tuple[PaddedSequences, PaddedSequences]:
    """The training sequences and one completion query per fact, padded to one length."""
    length = max(len(s) for s in corpus.sequences)
    train = PaddedSequences([{"input_ids": torch.tensor(s)} for s in corpus.sequences], length)
    queries = PaddedSequences(
        [completion_example(corpus.prompt(j), [y]) for j, (_, y) in enumerate(corpus.facts)],
        length,
    )
    return train, queries


class CausalTransformer(nn.Module):
    """Token and position embeddings, PyTorch's ``nn.TransformerEncoder`` with a causal mask, and
    a linear head: ``forward(input_ids) -> logits [batch, length, vocab]``."""

    def __init__(
        self, vocab: int, length: int, width: int = 64, layers: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: Tensor) -> Tensor:
        length = input_ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=input_ids.device)
        h = self.embed(input_ids) + self.position[:length]
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


class LanguageModel(L.LightningModule):
    """Next-token cross-entropy, logits at ``t`` against the label at ``t + 1``."""

    def __init__(self, model: CausalTransformer, lr: float = 3e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["input_ids"])[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


# ----------------------------------------------------------------------------------- scoring
@dataclass
class Ranks:
    """Rank (1 = most helpful) of the stating sequence, per fact answered correctly, and the
    token that carries the largest share of its score (``None``: not among those shown)."""

    facts: list[int]
    influence: list[int]
    dot_product: list[int]
    top_token: list[int | None] = field(default_factory=list)
    answer_share: list[float] = field(default_factory=list)  # the answer's share of the score

    @staticmethod
    def share(ranks: list[int], k: int) -> float:
        return sum(r <= k for r in ranks) / max(len(ranks), 1)


def answers(module: nn.Module, corpus: Corpus, queries: PaddedSequences) -> list[bool]:
    """Whether the model's most likely next token after each prompt is the fact's city."""
    with torch.no_grad():
        logits = module(queries.batch["input_ids"])
    out = []
    for j, (_, city) in enumerate(corpus.facts):
        position = len(corpus.prompt(j)) - 1
        out.append(int(logits[j, position].argmax()) == city)
    return out


def gradient_dot_products(
    module: nn.Module,
    task: LanguageModelingTask,
    train: Dataset[Any],
    queries: Dataset[Any],
    parameters: list[str] | None = None,
) -> Tensor:
    """``g_train . g_query`` for every pair ``[n_train, n_queries]`` over the same parameters:
    influence without the inverse curvature."""
    module.eval()
    fm = FunctionalModel(module, task, parameters, dtype=torch.float64)

    def gradients(data: Dataset[Any]) -> Tensor:
        rows = []
        for batch in DataLoader(data, batch_size=64):
            inputs, labels, _ = fm.check_batch(batch)
            rows.append(per_sample_gradients(fm, inputs, labels))
        return torch.cat(rows)

    return gradients(train) @ gradients(queries).T


def rank_of(scores: Tensor, target: int, helpful_is_low: bool) -> int:
    """1-based rank of row ``target`` when rows are sorted most helpful first."""
    column = scores if helpful_is_low else -scores
    return int((column < column[target]).sum()) + 1


# The answer's place in a stating sequence: "the capital of X is Y ." comes first.
ANSWER_POSITION = 5


def top_token(shares: Tensor | None, score: float) -> int | None:
    """Position of the token that carries the largest share of ``score`` (most in its
    direction), or ``None`` without shares."""
    if shares is None:
        return None
    return int((shares * math.copysign(1.0, score)).nan_to_num(-math.inf).argmax())


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=24, help="facts planted (default 24)")
    parser.add_argument("--distractors", type=int, default=216, help="sequences without a fact")
    parser.add_argument("--epochs", type=int, default=150, help="training epochs (default 150)")
    parser.add_argument("--damping", type=float, default=1e-3, help="lambda of H + lambda I")
    parser.add_argument("--cg-steps", type=int, default=50, help="conjugate-gradient iterations")
    parser.add_argument(
        "--parameters",
        nargs="+",
        default=["model.head.weight"],
        help="parameter name patterns (default: the output layer; '*' takes all, much slower)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="folder for the result file and the tables with decoded text (CSV, markdown)",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Ranks:
    """Build the corpus, train, score; returns the ranks of the stating sequences."""
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    corpus = make_corpus(args.facts, args.distractors, args.seed)
    train, queries = datasets(corpus)
    length = train.batch["input_ids"].shape[1]
    module = LanguageModel(CausalTransformer(len(corpus.vocab), length))
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    started = time.perf_counter()
    trainer.fit(module, DataLoader(train, batch_size=32, shuffle=True))
    print(f"trained {args.epochs} epochs in {time.perf_counter() - started:.0f} s")

    module.eval()
    correct = answers(module, corpus, queries)
    task = LanguageModelingTask(decode=corpus.decode)
    started = time.perf_counter()
    result = compute_influence(
        module,
        train,
        queries,
        task=task,
        solver=CG(max_iter=args.cg_steps),
        damping=args.damping,
        parameters=args.parameters,
        dtype=torch.float64,  # float32 CG loses the small curvature directions that matter here
        self_influence=False,
        token_k=5,  # the per-token shares of each fact's top 5 helpful and harmful sequences
        progress=False,
    )
    shares = result.diagnostics.get("time_token_shares", 0.0)
    print(f"influence in {time.perf_counter() - started:.0f} s ({shares:.1f} s: token shares)")
    if args.report is not None:
        result.save(args.report / "influence.pt")
        settings = LogSettings(n_val=len(corpus.facts), top_k=5, n_outliers=0)
        log_influence(result, [], train, queries, task, args.report, settings)
        print(f"tables with decoded text in {args.report}/")
    dots = gradient_dot_products(module, task, train, queries, args.parameters)

    ranks = Ranks([], [], [])
    for j, ok in enumerate(correct):
        if ok:
            ranks.facts.append(j)
            ranks.influence.append(rank_of(result.scores[:, j], corpus.stating[j], True))
            ranks.dot_product.append(rank_of(dots[:, j], corpus.stating[j], False))
            row = corpus.stating[j]  # dataset index = row: every training sequence is scored
            shares = result.token_shares_of(row, val_index=j)
            score = float(result.scores[row, j])
            ranks.top_token.append(top_token(shares, score))
            share = math.nan if shares is None else float(shares[ANSWER_POSITION]) / score
            ranks.answer_share.append(share)
    report(corpus, ranks)
    return ranks


def report(corpus: Corpus, ranks: Ranks) -> None:
    n = len(ranks.facts)
    print(f"facts answered correctly: {n} of {len(corpus.facts)}")
    methods = (("influence", ranks.influence), ("gradient dot product", ranks.dot_product))
    for name, r in methods:
        print(
            f"{name:>22}: stating sequence ranked first for {Ranks.share(r, 1):.0%}, "
            f"in the top 5 for {Ranks.share(r, 5):.0%}"
        )
    groups = (("reuse", True), ("do not reuse", False))
    for words, shared in groups:
        rows = [k for k, j in enumerate(ranks.facts) if corpus.shared_names[j] == shared]
        for name, r in methods:
            picked = [r[k] for k in rows]
            print(
                f"{name:>22}: first for {Ranks.share(picked, 1):.0%}, top 5 for "
                f"{Ranks.share(picked, 5):.0%} of the {len(rows)} facts whose names "
                f"distractors {words}"
            )
    answer = sum(t == ANSWER_POSITION for t in ranks.top_token) / max(n, 1)
    median = torch.tensor(ranks.answer_share, dtype=torch.float64).nanmedian()
    print(
        f"{'per-token shares':>22}: the answer token carries the largest share of the stating "
        f"sequence's score for {answer:.0%} of the {n} facts answered (median {median:.1%} of it)"
    )
    for k, j in enumerate(ranks.facts[:3]):
        print(
            f"  '{corpus.decode(corpus.prompt(j))} ...': stating sequence "
            f"'{corpus.decode(corpus.sequences[corpus.stating[j]])}' ranked "
            f"{ranks.influence[k]} (dot product {ranks.dot_product[k]})"
        )


def main(argv: list[str] | None = None) -> Ranks:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
