"""Peak memory of influence scoring for sequences of length 64 vs 256, at the same batch size.

The per-sample gradient of a per-sequence loss is already the sum of its per-token gradients, so
the gradients held per batch are ``batch x p`` numbers whatever the length; what grows with the
length is the activations of the forward and backward passes. Each length runs in its own process
(a fresh peak); glibc's mmap threshold is fixed at 1 MiB so that freed tensors leave the resident
set, and the peak is the resident high-water mark above the level just before the pass.

    python benchmarks/sequence_memory.py                      # prints the ratio last
    python benchmarks/sequence_memory.py --width 128 --layers 2 --vocab 2048

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
_MMAP_THRESHOLD = -3  # glibc's M_MMAP_THRESHOLD


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One length in this process: peak resident memory of a scoring pass over the sequences."""
    from planted_facts import CausalTransformer

    from lightning_influence import FunctionalModel, LanguageModelingTask
    from lightning_influence.core.data import as_indexed
    from lightning_influence.core.scores import example_pass

    ctypes.CDLL("libc.so.6").mallopt(_MMAP_THRESHOLD, 2**20)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    longest = max(args.lengths)  # the same parameters for every length
    model = CausalTransformer(args.vocab, longest, args.width, args.layers, args.heads).eval()
    task = LanguageModelingTask(chunk_size=args.chunk_size)
    fm = FunctionalModel(model, task)
    ids = torch.randint(0, args.vocab, (args.batch_size * args.batches, args.length))
    data = as_indexed(torch.utils.data.TensorDataset(ids), batch_size=args.batch_size)
    val_inverse = torch.randn(args.queries, fm.n_params)
    example_pass(fm, data.subset(data.indices[:2]), val_inverse)  # one-off set-up costs
    Path("/proc/self/clear_refs").write_text("5")  # reset the resident high-water mark
    before = _rss_kib("VmRSS")
    started = time.perf_counter()
    scored = example_pass(fm, data, val_inverse)
    seconds = time.perf_counter() - started
    peak = _rss_kib("VmHWM") - before
    assert scored.scores is not None
    return {
        "length": args.length,
        "batch_size": args.batch_size,
        "n_params": fm.n_params,
        "gradient_bytes_per_batch": args.batch_size * fm.n_params * 4,
        "peak_mib": peak / 1024,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs=2, default=[64, 256])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2, help="batches scored per length")
    parser.add_argument("--queries", type=int, default=8, help="validation inverse-HVPs held")
    parser.add_argument(
        "--chunk-size", type=int, default=1, help="sequences differentiated at once (task option)"
    )
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.length is not None:  # the child: one length
        print(json.dumps(measure(args)))
        return
    rows = []
    for length in args.lengths:
        argv = [a for a in sys.argv[1:]] + ["--length", str(length)]
        out = subprocess.run(
            [sys.executable, __file__, *argv], check=True, capture_output=True, text=True
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(
            f"length {length:4d}: peak {rows[-1]['peak_mib']:8.1f} MiB above the start "
            f"(gradients of one batch: {rows[-1]['gradient_bytes_per_batch'] / 2**20:.1f} MiB, "
            f"{rows[-1]['n_params']:,} parameters, batch {args.batch_size}), "
            f"{rows[-1]['seconds']:.1f} s"
        )
    ratio = rows[1]["peak_mib"] / rows[0]["peak_mib"]
    print(f"peak memory ratio, length {args.lengths[1]} / {args.lengths[0]}: {ratio:.2f}x")
    print(json.dumps({"rows": rows, "ratio": ratio}))


if __name__ == "__main__":
    main()
