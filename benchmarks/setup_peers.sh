#!/usr/bin/env bash
# Create benchmarks/.venv-peers with the package, torch 2.13.0 and the peer libraries
# (captum, kronfluence, pyDVL, dattri) pinned in benchmarks/requirements-peers.txt.
# Usage: bash benchmarks/setup_peers.sh
# TORCH_SPEC picks the torch (default the CPU build torch==2.13.0).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
# The package's own set-up (venv, torch, the package), in a separate venv.
VENV="${PEERS_VENV:-$here/.venv-peers}" source "$root/scripts/setup_env.sh" ""
constraints="$(mktemp)"
python -c "import torch; print(f'torch=={torch.__version__}')" > "$constraints"
# Each peer on its own, so one that fails to install does not block the others.
while read -r req; do
    case "$req" in ''|'#'*) continue ;; esac
    if ! pip install --quiet --constraint "$constraints" "$req"; then
        echo "setup_peers: could not install $req" >&2
    fi
done < "$here/requirements-peers.txt"
# kronfluence pulls a torchvision whose compiled ops do not load beside this torch, and
# torchmetrics (through lightning) imports torchvision when present: no benchmark needs it.
pip uninstall --quiet --yes torchvision >/dev/null 2>&1 || true
rm -f "$constraints"
python - <<'PY'
import importlib
for name in ["torch", "captum", "kronfluence", "pydvl", "dattri"]:
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # report, do not stop: the benchmark records the failure
        print(f"{name} FAILED: {type(exc).__name__}: {exc}")
PY
