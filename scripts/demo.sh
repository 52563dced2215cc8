#!/usr/bin/env bash
# Main job on the built-in default: train on a 2-D toy set, sample, write the PNG and the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/flowdiff demo "$@"
