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
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 || echo python )}"
# mmdwnet from this checkout, analysis_tools (tools/) for the kernel-time step
export PYTHONPATH="$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH}"

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)' 2>/dev/null
case $? in
  0) ;;
  2) echo "gpu_check: no CUDA GPU visible to $PY" >&2; exit 2 ;;
  *) echo "gpu_check: $PY cannot import torch" >&2; exit 1 ;;
esac
# A GPU machine with torch but neither mmdwnet's libraries nor a network (the lent ones):
# install the bundle carried in .device/ (tools/device_bundle.py) into a scratch directory.
if ! "$PY" -c 'import mmcv.ops, mmdet, mmseg, mmpretrain' 2>/dev/null; then
  if [ ! -f .device/manifest.json ]; then
    echo "gpu_check: $PY cannot import mmcv.ops, mmdet, mmseg and mmpretrain; set up with" \
         "'FORCE_CUDA=1 bash tools/install.sh', or carry the bundle of tools/device_bundle.py" >&2
    exit 1
  fi
  SITE="${MMDWNET_DEVICE_SITE:-/tmp/mmdwnet-site}"
  "$PY" tools/device_bundle.py --install "$SITE" || exit 1
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
exec "$PY" tools/gpu_check.py "$@"
