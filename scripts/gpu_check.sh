#!/usr/bin/env bash
# Smoke test of every CUDA path on one GPU (about 5 minutes): one PASS/FAIL/SKIP line per check
# (see src/featdenoise/benchmarks/gpu_check.py for the list). Exit status 1 if any check failed.
#
#   scripts/gpu_check.sh                 # on GPU 0 (or: --device cuda:1)
#   scripts/gpu_check.sh --only ops,sync # some checks only
#   scripts/gpu_check.sh --dry-run       # the same wiring on the CPU, tiny shapes (< 1 minute)
#
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m featdenoise.benchmarks.gpu_check "$@"
