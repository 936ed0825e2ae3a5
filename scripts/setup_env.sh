#!/usr/bin/env bash
# Create (or reuse) ./.venv and install the package with the given extras.
# Usage: source scripts/setup_env.sh "test,docs"
# TORCH_SPEC chooses the torch to install when the environment has none
# (default: the CPU build torch==2.13.0; a GPU user can set TORCH_SPEC=torch or keep their own).
set -euo pipefail
extras="${1:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
    pip install --quiet "${TORCH_SPEC:-torch==2.13.0}" numpy
fi
spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
# The constraint keeps pip from replacing the torch already installed.
constraints="$(mktemp)"
python -c "import torch; print(f'torch=={torch.__version__}')" > "$constraints"
pip install --quiet --constraint "$constraints" --editable "$spec"
rm -f "$constraints"
