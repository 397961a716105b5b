#!/usr/bin/env bash
# Multi-GPU checks (NCCL) on one node with 2+ GPUs: parameter and BatchNorm-buffer checksums equal
# on every rank after DDP training, every evaluation image counted once, one writer, then resume
# from that run's checkpoint with another number of processes. One PASS/FAIL/SKIP line per check
# (tests/gpu/multi_gpu.py; `pytest -m needs_cuda tests/gpu` runs this script on 2+ GPUs).
#
#   scripts/gpu_check_multi.sh            # all GPUs of this node (nvidia-smi -L)
#   scripts/gpu_check_multi.sh 4          # 4 processes, then resume with 3
#   scripts/gpu_check_multi.sh --dry-run  # 2 CPU processes (gloo), then 1: the wiring only
#
# Several nodes: run the same two torchrun commands below with --nnodes/--node-rank/--rdzv-endpoint
# on each node and a shared --out folder.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
DRY=""
NPROC=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY="--dry-run" ;;
    *[!0-9]*|"") echo "usage: $0 [--dry-run] [NPROC]" >&2; exit 2 ;;
    *) NPROC="$arg" ;;
  esac
done
if [ -z "$NPROC" ]; then
  if [ -n "$DRY" ]; then NPROC=2; else NPROC=$(nvidia-smi -L 2>/dev/null | wc -l); fi
fi
if [ "$NPROC" -lt 2 ]; then
  echo "need 2 or more processes (found $NPROC GPUs); use --dry-run without GPUs" >&2
  exit 2
fi
RESUME=$(( NPROC > 2 ? NPROC - 1 : 1 ))  # another world size for the resume
OUT=$(mktemp -d "${TMPDIR:-/tmp}/featdenoise-gpu-multi.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
status=0
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  tests/gpu/multi_gpu.py --stage train --out "$OUT" $DRY || status=1
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$RESUME" \
  tests/gpu/multi_gpu.py --stage resume --out "$OUT" $DRY || status=1
exit $status
