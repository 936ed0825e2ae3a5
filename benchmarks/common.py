"""Helpers shared by the benchmark scripts: setup, timing, metrics, fitted digits models, tables,
JSON output and child processes.

The benchmarks are plain scripts (``python benchmarks/engine.py``); they import this module from
their own folder. Nothing here is part of the package.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_influence import detection_metrics

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
CACHE = RESULTS / "cache"
WEIGHT_DECAY = 0.01  # L2 of the digits reference models; damping = weight decay reproduces it

# glibc hands blocks above 32 MiB back to the OS on free, so every [batch, p] gradient buffer of a
# large model is page-faulted in again (2-3x slower per-sample gradients here). Child processes
# of the scaling benchmarks run with these settings; see docs/benchmarks.md.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
# For peak-memory figures: a fixed 1 MiB mmap threshold. glibc's default threshold rises after
# each large free, so later blocks of that size come from the heap and its resident size creeps
# up with the number of batches (1.20x from 10k to 20k examples at p = 1M), though nothing is held.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def setup(threads: int = 1, seed: int = 0) -> None:
    """One intra-op thread, a fixed seed, and ``tests/`` + ``examples/`` importable."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    for sub in ("tests", "examples", "benchmarks"):
        path = str(ROOT / sub)
        if path not in sys.path:
            sys.path.insert(0, path)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


@dataclass
class Timing:
    """Times of repeated calls (seconds, by the clock ``timed`` was given) and the value of the
    last call."""

    times: list[float]
    value: Any

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def timed(
    fn: Callable[[], Any],
    repeats: int = 3,
    warmup: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Call ``fn`` ``warmup + repeats`` times; keep the times of the last ``repeats`` by
    ``clock`` (wall time; ``time.process_time`` for this process's CPU time, which drifts far
    less with the load of a shared machine)."""
    value = None
    for _ in range(warmup):
        value = fn()
    times = []
    for _ in range(repeats):
        start = clock()
        value = fn()
        times.append(clock() - start)
    return Timing(times, value)


class Clock:
    """Wall and process CPU seconds since creation. CPU time counts every thread of this process
    and nothing of other processes, so it holds up on a machine shared with other jobs."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


# ----------------------------------------------------------------------------------- metrics
def _np(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().double().cpu().numpy()
    return np.asarray(t, dtype=np.float64)


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two arrays, flattened."""
    return float(np.corrcoef(_np(a).ravel(), _np(b).ravel())[0, 1])


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation of two arrays, flattened."""
    from scipy.stats import spearmanr

    return float(spearmanr(_np(a).ravel(), _np(b).ravel())[0])


def topk_overlap(ref: Any, est: Any, k: int = 10) -> float:
    """Per validation column, the share of the ``k`` training rows with the largest ``|ref|``
    that are also among the ``k`` largest ``|est|``; averaged over columns."""
    r, e = np.abs(_np(ref)), np.abs(_np(est))
    if r.ndim == 1:
        r, e = r[:, None], e[:, None]
    hits = []
    for j in range(r.shape[1]):
        top_r = set(np.argsort(-r[:, j])[:k].tolist())
        top_e = set(np.argsort(-e[:, j])[:k].tolist())
        hits.append(len(top_r & top_e) / k)
    return float(np.mean(hits))


def auroc(scores: Any, positives: Any, n: int) -> float:
    """Area under the ROC curve of ``scores`` (higher = more suspect) for the ``positives``."""
    labels = torch.zeros(n, dtype=torch.bool)
    labels[torch.as_tensor(np.asarray(positives, dtype=np.int64))] = True
    return detection_metrics(torch.as_tensor(_np(scores)), labels, fractions=())["auroc"]


def agreement(ref: Any, est: Any, k: int = 10) -> dict[str, float]:
    """Pearson, Spearman and top-k overlap of an estimate against a reference score matrix."""
    return {
        "pearson": pearson(ref, est),
        "spearman": spearman(ref, est),
        f"top{k}": topk_overlap(ref, est, k),
    }


# ------------------------------------------------------------------------ digits references
def fitted_digits(
    kind: str, weight_decay: float = WEIGHT_DECAY, flip_fraction: float = 0.0
) -> tuple[torch.nn.Module, torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    """The tests' standardised digits and a model at its L2-regularised optimum (float64).

    ``kind`` is ``"logreg"`` (multinomial logistic regression, 650 parameters) or ``"mlp"``
    (64-32-10 tanh, 2,410 parameters). ``flip_fraction`` flips that share of the training labels
    (``examples/digits.py``'s ``flip_labels``, random mode, seed 0) before fitting; the flipped
    positions are then ``train.flipped``. L-BFGS fits are cached under ``benchmarks/results/cache``.
    """
    setup(torch.get_num_threads())
    from models import digits, fit_lbfgs, logistic_regression, mlp  # tests/models.py

    makers = {"logreg": logistic_regression, "mlp": mlp}
    if kind not in makers:
        raise ValueError(f"`kind` must be one of {sorted(makers)}, got {kind!r}.")
    train, val = digits()
    train.flipped = torch.zeros(0, dtype=torch.long)  # type: ignore[attr-defined]
    if flip_fraction > 0:
        from digits import flip_labels  # examples/digits.py

        x, y = train.tensors
        noisy, flipped = flip_labels(y, flip_fraction, "random", seed=0)
        train = torch.utils.data.TensorDataset(x, noisy)
        train.flipped = flipped  # type: ignore[attr-defined]
    model = makers[kind]()
    path = CACHE / f"digits_{kind}_wd{weight_decay:g}_flip{flip_fraction:g}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        fit_lbfgs(model, *train.tensors, weight_decay)
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model, train, val


def float32(
    model: torch.nn.Module, *datasets: torch.utils.data.TensorDataset
) -> tuple[torch.nn.Module, ...]:
    """A float32 copy of the model and of the float tensors of each dataset."""
    import copy

    from torch.utils.data import TensorDataset

    out: list[Any] = [copy.deepcopy(model).float()]
    for ds in datasets:
        out.append(TensorDataset(*[t.float() if t.is_floating_point() else t for t in ds.tensors]))
    return tuple(out)


# --------------------------------------------------------------------------- tables and JSON
def fmt(value: Any) -> str:
    """Short human format for a table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.01 or value == 0:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value)


def digits_cnn_epoch(model: Any, loader: Any, opt: Any) -> float:
    """Wall time of one plain PyTorch epoch of ``DigitsCNN``'s training step (cross-entropy plus
    its L2 term), without Lightning around it."""
    start = time.perf_counter()
    for x, y in loader:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        params = torch.cat([p.reshape(-1) for p in model.parameters()])
        (loss + 0.5 * model.hparams.weight_decay * (params**2).sum()).backward()
        opt.step()
    return time.perf_counter() - start


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    """A markdown table of ``rows`` (dicts) restricted to ``columns``."""
    lines = [f"\n### {title}\n"] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("| " + " | ".join("---" for _ in columns) + " |")
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the machine description added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    tmp.replace(path)
    print(f"wrote {path.relative_to(ROOT)}", flush=True)
    return path


def run_child(
    script: str,
    args: Sequence[str],
    env: dict[str, str] | None = None,
    timeout: float | None = 3600,
    reuse: bool = False,
) -> dict[str, Any]:
    """Run ``python benchmarks/<script> <args>`` in a fresh process; return the JSON object it
    prints on its last line (so each measurement's peak memory is its own).

    Every result is also kept under ``benchmarks/results/cache``; with ``reuse`` a result already
    there for the same script, arguments and environment is returned without running again (the
    scaling and memory benchmarks share their largest runs this way).
    """
    key = "_".join([Path(script).stem, *args, *sorted(f"{k}={v}" for k, v in (env or {}).items())])
    key = "".join(c if c.isalnum() or c in "-=." else "_" for c in key)
    cached = CACHE / f"{key}.json"
    if reuse and cached.exists():
        return {**json.loads(cached.read_text()), "reused": True}
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{script} {' '.join(args)} failed with exit code {proc.returncode}:\n"
            f"{proc.stderr[-3000:]}"
        )
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["measured"] = time.strftime("%Y-%m-%d %H:%M")
    CACHE.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(out, indent=2))
    return out
