#!/usr/bin/env bash
# The project's test command (README, CI): lint, then the test suite.
#
#   bash scripts/test.sh [extra pytest args, e.g. -k budget or -x]
#
# Uses .venv (create it with `bash scripts/setup_env.sh`); PYTHON=/path/to/python overrides.
# Exits non-zero on lint errors, failing tests, and when no tests are collected (pytest exit 5).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || { echo "test.sh: $PY not found; run: bash scripts/setup_env.sh" >&2; exit 1; }

# Offline Hugging Face: otherwise every hub lookup retries for ~45 s without network.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}" MPLBACKEND="${MPLBACKEND:-Agg}"

echo "test.sh: ruff check ."
"$PY" -m ruff check .

echo "test.sh: pytest"
rc=0
"$PY" -m pytest -q -p no:cacheprovider --durations=10 tests "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
    echo "test.sh: ERROR: pytest collected no tests (exit 5)" >&2
fi
exit "$rc"
