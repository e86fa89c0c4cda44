#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of a few minutes (sessions are lent a GPU rarely and
# briefly): the CUDA tests (the optimizer and the task families against their CPU results), and the
# optimizer's overhead against Adam on the GPU, whose goal is at most 1.2x Adam's iteration at 10M+
# parameters (docs/optimizer.md, "Overhead against Adam"). Reports go to $OUT (default out/gpu).
#
#   bash scripts/gpu_checks.sh            # after scripts/setup.sh with a CUDA torch
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_checks: torch sees no CUDA device; nothing to check here" >&2
    exit 2
fi
"$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))' | tee "$OUT/device.txt"
"$PY" -m pytest -q -p no:warnings tests/test_cuda.py tests/tasks/test_tasks_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt"
"$PY" benchmarks/optimizer_overhead.py --device cuda --reps 30 2>&1 | tee "$OUT/overhead_cuda.txt"
"$PY" benchmarks/optimizer_overhead.py --device cuda --reps 30 --compile 2>&1 | tee "$OUT/overhead_cuda_compile.txt"
