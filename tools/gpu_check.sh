#!/usr/bin/env bash
# The GPU acceptance in one command, on a machine with a CUDA GPU and mmdwnet set up
# (FORCE_CUDA=1 bash tools/install.sh): CUDA tests, Triton against a float64 reference,
# AMP training steps, kernel times against their predicted bounds, tools/benchmark.py on
# CUDA and a few iterations of each task's I-D-DW-T config through tools/dist_train.sh,
# then tools/dist_test.sh (tools/gpu_check.py says what each step checks). Writes
# work_dirs/gpu_check/report.{json,md}; exit status 1 on any failure, 2 where no GPU is
# visible.
#
#   bash tools/gpu_check.sh [--out DIR] [--steps STEP ...]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
# analysis_tools (tools/) for the kernel-time step
export PYTHONPATH="$PWD/tools${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" tools/gpu_check.py "$@"
