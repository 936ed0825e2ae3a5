#!/usr/bin/env bash
# Install the package, train a small CNN on scikit-learn's digits with the influence callback,
# and write TensorBoard logs. Extra arguments go to the example script.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh "examples"
python examples/digits_influence.py "$@"
