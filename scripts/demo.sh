#!/usr/bin/env bash
# Main job on the built-in default: train on a 2-D toy set, sample, write the PNG and the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# --overwrite: re-running the demo replaces the previous demo run in runs/demo (nothing else is touched).
exec .venv/bin/flowdiff demo --overwrite "$@"
