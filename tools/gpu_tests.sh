#!/usr/bin/env bash
# The GPU checks in one command, on a machine with a CUDA GPU and mmdwnet set up
# (bash tools/install.sh): the Triton I-D-DW kernels natively and through the dispatcher,
# then the operator tests. Refuses to run (exit 2) where no GPU is visible, rather than
# letting the CUDA tests skip.
#
#   bash tools/gpu_tests.sh [PYTEST ARGS]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_tests.sh: no CUDA GPU visible to torch " + torch.__version__)
print("gpu_tests.sh:", torch.cuda.get_device_name(0), "torch", torch.__version__)' || exit 2
exec "$PY" -m pytest -rs tests/test_ops/test_triton_idwconv.py \
  tests/test_ops/test_inhomogeneous_dwconv.py tests/test_ops/test_predicted_idwconv.py "$@"
