#!/usr/bin/env bash
# Install everything, then lint, type-check, build the docs strictly and run all tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow and not ddp"`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh "test,docs"
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy
echo "== docs"; NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "${SITE_DIR:-.site}"
echo "== pytest"; python -m pytest "$@"
