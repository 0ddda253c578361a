#!/usr/bin/env bash
# Lint and run the whole test suite on the CPU (no GPU, no network but PyPI).
# Creates .venv with requirements-test.txt on first use; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -r requirements-test.txt

.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
