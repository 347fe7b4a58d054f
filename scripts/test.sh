#!/usr/bin/env bash
# Set up, lint, and run the test suite (a few minutes on 2 cores). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
ruff check .
ruff format --check .
lint-imports  # the layer contract in pyproject.toml
python -m pytest -q "$@"
