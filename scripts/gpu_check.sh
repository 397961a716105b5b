#!/usr/bin/env bash
# Every CUDA path on one GPU (about 5 minutes): the needs_cuda tests of tests/gpu, one PASS line
# per check in the "GPU checks" section at the end. Exit status: pytest's (0: all passed).
#
#   scripts/gpu_check.sh                   # on GPU 0 (or: --device cuda:1)
#   scripts/gpu_check.sh --only ops,sync   # some checks only (pytest -k "ops or sync")
#   scripts/gpu_check.sh --dry-run         # the same checks on the CPU, tiny shapes (< 1 minute)
#   scripts/gpu_check.sh -x --basetemp DIR # other arguments go to pytest (DIR: work folders kept)
#
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
usage() { echo "usage: $0 [--dry-run] [--device cuda|cuda:N] [--only NAME,...] [PYTEST-ARGS]" >&2; exit 2; }
MARK="needs_cuda"
ONLY=""
PYTEST=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) MARK="not needs_cuda" ;;
    --device)
      [ $# -ge 2 ] || usage
      case "$2" in
        cuda) ;;
        cuda:[0-9]|cuda:[0-9][0-9]) export CUDA_VISIBLE_DEVICES="${2#cuda:}" ;;
        *) echo "--device $2: use cuda or cuda:N" >&2; exit 2 ;;
      esac
      shift ;;
    --only) [ $# -ge 2 ] || usage; ONLY="$2"; shift ;;
    *) PYTEST+=("$1") ;;
  esac
  shift
done
if [ "$MARK" = "needs_cuda" ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "PyTorch sees no CUDA device: the GPU checks need one; use --dry-run on a machine without one" >&2
  exit 2
fi
if [ -n "$ONLY" ]; then
  K=$(echo "$ONLY" | tr '-' '_' | sed 's/,/ or /g')
  PYTEST+=(-k "$K")
fi
exec "$PYTHON" -m pytest -q -p no:cacheprovider -m "$MARK" tests/gpu ${PYTEST[@]+"${PYTEST[@]}"}
