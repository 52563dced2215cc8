#!/usr/bin/env bash
# Run the test suite in the project's own environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all,bench
exec .venv/bin/python -m pytest "$@"
