#!/usr/bin/env bash
# Lint and run the whole test suite on the CPU (no GPU, no network but PyPI).
# Creates .venv with requirements-test.txt on first use; extra arguments go to pytest.
# Both steps always run; the script fails if either does.
set -uo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv || exit 1
fi
.venv/bin/python -m pip install --quiet -r requirements-test.txt || exit 1

.venv/bin/ruff check .
lint=$?
.venv/bin/python -m pytest -q "$@"
tests=$?
if [ "$lint" -ne 0 ]; then
    echo "run-tests.sh: ruff check failed" >&2
fi
[ "$lint" -eq 0 ] && [ "$tests" -eq 0 ]
