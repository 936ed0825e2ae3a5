#!/usr/bin/env bash
# Install everything, then lint, type-check, build the docs strictly and run all tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow and not ddp"`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh "test,docs"
# A real browser for the TensorBoard screenshot test (skipped, with the reason, without one).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; }; } \
        || echo "chromium could not be installed; the browser test will be skipped"
fi
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy
echo "== docs"; NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "${SITE_DIR:-.site}"
echo "== pytest"; python -m pytest "$@"
