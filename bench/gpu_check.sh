#!/usr/bin/env bash
# The bring-up run of a CUDA machine within a time budget: preflight, build smolvlm_fast._C for this GPU only, the
# CUDA kernel tests (also under compute-sanitizer memcheck, racecheck, synccheck), the other `gpu` tests, the Triton
# kernels' `gpu` tests, short benchmarks. The steps and their limits are in bench/gpu_check.py (its docstring says
# what each writes); this wrapper only picks the Python and the budget.
#
#   bash bench/gpu_check.sh                        # everything that fits in GPU_CHECK_BUDGET_S (default 540 s)
#   bash bench/gpu_check.sh --dry-run              # preflight, then the plan as "skipped" lines; runs nothing
#   GPU_CHECK_BUDGET_S=300 bash bench/gpu_check.sh
#   PYTHON=/path/to/python GPU_CHECK_RESULTS_DIR=/tmp/out bash bench/gpu_check.sh
#
# Writes one JSON line per step to $GPU_CHECK_RESULTS_DIR/gpu_check.jsonl (default bench/results) and each step's
# log beside it as gpu_check_<step>.log. Exit status: 0 all steps that ran passed, 1 a step failed or timed out,
# 2 no usable CUDA GPU (the preflight line says why; nothing else runs).
# On a lent machine that returns few files, pack them: tar czf "$OUT/gpu_check.tgz" bench/results/gpu_check*
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHON=$PY PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
