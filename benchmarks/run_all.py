"""Run every CPU benchmark and print its tables; each writes ``benchmarks/results/<name>.json``.

Usage::

    python benchmarks/run_all.py            # engine, scaling, peers (~45 min on one thread)
    python benchmarks/run_all.py --reuse    # reuse the child runs cached by an earlier run
    python benchmarks/run_all.py --skip peers

``engine.py`` and ``scaling.py`` run with this interpreter (the package's environment);
``peers.py`` runs with ``benchmarks/.venv-peers/bin/python`` (``bash benchmarks/setup_peers.sh``)
and is skipped, with a message, when that environment does not exist. The GPU script
(``benchmarks/gpu.py``) is not run here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import BENCH, ROOT

PEERS_PYTHON = BENCH / ".venv-peers" / "bin" / "python"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="reuse cached child runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=["engine", "scaling", "peers"])
    args = parser.parse_args()
    reuse = ["--reuse"] if args.reuse else []
    jobs = [
        ("engine", sys.executable, ["engine.py", *reuse]),
        ("scaling", sys.executable, ["scaling.py", *reuse]),
        ("peers", str(PEERS_PYTHON), ["peers.py"]),
    ]
    failed = []
    for name, python, argv in jobs:
        if name in args.skip:
            continue
        if name == "peers" and not PEERS_PYTHON.exists():
            print("peers: skipped, run `bash benchmarks/setup_peers.sh` first", flush=True)
            continue
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        code = subprocess.call([python, str(BENCH / argv[0]), *argv[1:]], cwd=ROOT)
        print(f"=== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
