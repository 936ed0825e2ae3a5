"""Time and peak RSS of ``import lightning_influence`` in fresh processes, beside ``import torch``.

Each statement runs in its own child process, best of ``--repeat`` (wall seconds of the whole
interpreter, and seconds of the statement alone); the peak RSS is the child's own ``ru_maxrss``
from ``os.wait4`` (the resource usage of that one child). The last line printed is a JSON object.

Usage::

    python benchmarks/import_time.py
    python benchmarks/import_time.py --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STATEMENTS = {
    "torch": "import torch",
    "package": "import lightning_influence",
    "compute": "from lightning_influence import compute_influence",
    "callback": "from lightning_influence import InfluenceCallback",
}
HEAVY = ("lightning", "matplotlib", "wandb", "tensorboard", "scipy", "pandas")

_CHILD = """
import sys, time
t = time.perf_counter()
{statement}
seconds = time.perf_counter() - t
print(seconds, ",".join(m for m in {heavy!r} if m in sys.modules))
"""


def measure(statement: str, repeat: int) -> dict[str, object]:
    """Best wall time of ``statement`` over ``repeat`` fresh interpreters, and its peak RSS."""
    walls: list[float] = []
    inner: list[float] = []
    rss: list[float] = []
    heavy = ""
    for _ in range(repeat):
        code = _CHILD.format(statement=statement, heavy=HEAVY)
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        walls.append(time.perf_counter() - start)
        out = child.stdout.read() if child.stdout else ""
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{statement!r} failed in a fresh interpreter")
        seconds, heavy = [*out.strip().split(" "), ""][:2]
        inner.append(float(seconds))
        rss.append(usage.ru_maxrss / 1024)
    return {
        "wall_s": round(min(walls), 3),
        "import_s": round(min(inner), 3),
        "peak_rss_mib": round(max(rss), 1),
        "heavy_modules": heavy.split(",") if heavy else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per statement")
    args = parser.parse_args()
    results = {name: measure(stmt, args.repeat) for name, stmt in STATEMENTS.items()}
    print(f"{'statement':<52} {'wall s':>7} {'import s':>9} {'peak RSS MiB':>13}  heavy modules")
    for name, r in results.items():
        heavy = ", ".join(r["heavy_modules"]) or "-"  # type: ignore[arg-type]
        print(
            f"{STATEMENTS[name]:<52} {r['wall_s']:>7} {r['import_s']:>9} "
            f"{r['peak_rss_mib']:>13}  {heavy}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
