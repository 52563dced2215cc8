#!/usr/bin/env bash
# Create .venv (if needed) and install flowdiff with the CPU torch pin. Idempotent.
# Usage: scripts/setup.sh [EXTRAS]   (default "all"; "all,bench" adds the peer libraries
# diffusers and k-diffusion used by the benchmarks and the cross-library tests).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-all}
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# The stamp skips a reinstall when nothing that decides the install changed.
stamp=.venv/.flowdiff-installed-${EXTRAS//,/-}
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
  if [[ ",$EXTRAS," == *",bench,"* ]]; then
    # k-diffusion's declared dependencies pull torchvision and a CUDA torch; flowdiff only
    # imports k_diffusion/sampling.py, so install the package without them.
    .venv/bin/python -m pip install -q --no-deps "k-diffusion>=0.1"
  fi
  echo "$want" > "$stamp"
fi
