#!/usr/bin/env bash
# Create .venv and install the suite. With --test also the test requirements.
# Usage: bash scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first and alone, pinned, so nothing later pulls another build.
.venv/bin/pip install --quiet torch==2.13.0
requirements=requirements.txt
if [ "${1:-}" = "--test" ]; then
  requirements=requirements-test.txt
fi
.venv/bin/pip install --quiet -r "$requirements"
# open-clip-torch only provides the CLIP BPE merges for building tokenizers offline; its torchvision
# dependency has no CPU build, so it is installed without dependencies.
.venv/bin/pip install --quiet --no-deps open-clip-torch==3.3.0
.venv/bin/pip install --quiet --no-deps -e .
echo "environment ready: .venv"
