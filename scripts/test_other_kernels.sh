#!/usr/bin/env bash
# The numerics tests (marker `numerics`) once more, under CPU kernels other than this machine's:
# PyTorch's and oneDNN's dispatch emulate a CPU without AVX-512 (AVX2), or, on a machine that
# already is one, a CPU without AVX (SSE4.1). Float rounding differs between kernel sets, so a
# test of numbers that passes only on its author's CPU fails here.
set -euo pipefail
PY=${PY:-.venv/bin/python}
native=$("$PY" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')
if [ "$native" = AVX512 ]; then aten=avx2; onednn=AVX2; else aten=default; onednn=SSE41; fi
echo "numerics tests under ATEN_CPU_CAPABILITY=$aten ONEDNN_MAX_CPU_ISA=$onednn (this CPU: $native)"
ATEN_CPU_CAPABILITY=$aten ONEDNN_MAX_CPU_ISA=$onednn "$PY" -m pytest -q -m "numerics and not slow" "$@"
