#!/usr/bin/env bash
# Set up everything mmdwnet needs, then optionally run the demo or the tests.
#
#   bash tools/install.sh            # set up only
#   bash tools/install.sh demo       # set up, then run demo/quickstart.py
#   bash tools/install.sh test [ARGS] # set up, then run pytest tests/ [ARGS]
#
# Which Python: $MMDWNET_PYTHON if set, else the active virtualenv/conda env,
# else a virtualenv at $MMDWNET_VENV (default: <repo>/.venv), created with
# python3.11. A component that already works in that environment (a torch +
# torchvision pair, mmcv with its compiled ops, ...) is kept, not replaced.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[mmdwnet setup] $*"; }
die() { echo "[mmdwnet setup] ERROR: $*" >&2; exit 1; }

# Pinned versions (keep in sync with setup.py / requirements/runtime.txt).
TORCH_SPEC='torch===2.13.0'   # '===' skips the local +cpu wheel whose torchvision cannot load
TORCHVISION_SPEC='torchvision==0.28.0'
SETUPTOOLS_SPEC='setuptools>=77.0.3,<81'
MMENGINE_SPEC='mmengine==0.10.7'
MMCV_SPEC='mmcv==2.1.0'
TASK_SPECS=('mmdet==3.3.0' 'mmsegmentation==1.2.2' 'mmpretrain==1.2.0' 'ftfy' 'regex')
TEST_SPECS=('pytest>=7')

# ---------------------------------------------------------------- python ---
if [ -n "${MMDWNET_PYTHON:-}" ]; then
  PY="$MMDWNET_PYTHON"; log "using MMDWNET_PYTHON=$PY"
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  PY="$VIRTUAL_ENV/bin/python"; log "using the active virtualenv $VIRTUAL_ENV"
elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
  PY="$CONDA_PREFIX/bin/python"; log "using the active conda env $CONDA_PREFIX"
else
  VENV="${MMDWNET_VENV:-$ROOT/.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    BASE_PY="$(command -v python3.11 || command -v python3 || true)"
    [ -n "$BASE_PY" ] || die "no python3.11 found on PATH; install Python 3.11 or set MMDWNET_PYTHON"
    log "creating virtualenv $VENV with $BASE_PY"
    "$BASE_PY" -m venv "$VENV" || die "could not create the virtualenv $VENV"
  fi
  PY="$VENV/bin/python"; log "using virtualenv $VENV"
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 8)' 2>/dev/null \
  || die "$PY is not a working Python >= 3.8"
PIP=("$PY" -m pip --disable-pip-version-check)

pip_install() {  # pip_install WHAT ARGS...
  local what="$1"; shift
  log "installing $what: pip install $*"
  "${PIP[@]}" install "$@" || die "installing $what failed (pip install $*); see the pip output above"
}

# One interpreter start checks every component; prints the names that need work.
check() {  # run outside the repo so that `import mmdwnet` means the installed package
  (cd / && "$PY" - "$ROOT") <<'PYCHECK'
import importlib, importlib.metadata, os, sys, warnings
warnings.filterwarnings('ignore')  # deprecation chatter of the imports below
root = sys.argv[1]
todo = []
def ver(mod):
    return tuple(int(p) for p in mod.__version__.split('+')[0].split('.')[:3] if p.isdigit())
try:
    import setuptools, pkg_resources  # noqa: F401  (mmengine/mmcv import pkg_resources)
    if not ((77, 0, 3) <= ver(setuptools) < (81,)):
        todo.append('setuptools')
except Exception:
    todo.append('setuptools')
try:
    import torch, torchvision
    torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)  # compiled extension loads
except Exception:
    todo.append('torch')
try:
    import mmengine
    if mmengine.__version__ != '0.10.7':
        todo.append('mmengine')
except Exception:
    todo.append('mmengine')
try:
    import mmcv
    from mmcv.ops import RoIAlign, nms  # noqa: F401  (needs the compiled ops)
    if not ((2, 1, 0) <= ver(mmcv) < (2, 2, 0)):
        todo.append('mmcv')
except Exception:
    todo.append('mmcv')
for name, mod, want in [('mmdet', 'mmdet', '3.3.0'), ('mmsegmentation', 'mmseg', '1.2.2'),
                        ('mmpretrain', 'mmpretrain', '1.2.0'), ('ftfy', 'ftfy', None),
                        ('regex', 'regex', None)]:
    try:
        m = importlib.import_module(mod)
        if want and m.__version__ != want:
            todo.append(name)
    except Exception:
        todo.append(name)
try:
    import pytest  # noqa: F401
except Exception:
    todo.append('pytest')
try:
    import mmdwnet
    importlib.metadata.version('mmdwnet')  # installed, not just found in the cwd
    if os.path.dirname(os.path.dirname(os.path.abspath(mmdwnet.__file__))) != root:
        todo.append('mmdwnet')
except Exception:
    todo.append('mmdwnet')
print(' '.join(todo))
PYCHECK
}

log "checking the environment ($PY)"
TODO=" $(check) "
needs() { [[ "$TODO" == *" $1 "* ]]; }

if [ "$TODO" = "  " ]; then
  log "everything is already installed"
else
  log "to install:$TODO"
  needs setuptools && pip_install setuptools "$SETUPTOOLS_SPEC"
  if needs torch; then
    log "no working torch + torchvision pair; installing the registry build (about 3 GB of wheels on a cold cache)"
    pip_install "torch + torchvision" "$TORCH_SPEC" "$TORCHVISION_SPEC"
  else
    log "keeping the installed torch/torchvision"
  fi
  # Everything after this point must leave the installed torch/torchvision/mmcv alone.
  CONSTRAINTS="$(mktemp)"; trap 'rm -f "$CONSTRAINTS"' EXIT
  pin() {  # the installed distributions' own versions (torch.__version__ may add +cu130)
    "$PY" -c 'import sys; from importlib.metadata import version
for name in sys.argv[1:]: print(f"{name}=={version(name)}")' "$@"
  }
  pin torch torchvision > "$CONSTRAINTS" || die "torch/torchvision are not installed after the torch step"
  needs mmengine && pip_install mmengine -c "$CONSTRAINTS" "$MMENGINE_SPEC"
  if needs mmcv; then
    log "building $MMCV_SPEC with its compiled ops from source (cold: about 10 minutes on 2 cores; pip caches the wheel)"
    pip_install "ninja (parallel compile)" -c "$CONSTRAINTS" ninja
    MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" pip_install mmcv --no-build-isolation -c "$CONSTRAINTS" "$MMCV_SPEC"
  else
    log "keeping the installed mmcv (ops available)"
  fi
  pin mmcv >> "$CONSTRAINTS" || die "mmcv is not installed after the mmcv step"
  specs=()
  for s in "${TASK_SPECS[@]}"; do
    name="${s%%[=<>]*}"; needs "$name" && specs+=("$s")
  done
  [ ${#specs[@]} -eq 0 ] || pip_install "OpenMMLab task libraries" -c "$CONSTRAINTS" "${specs[@]}"
  needs pytest && pip_install "test requirements" -c "$CONSTRAINTS" "${TEST_SPECS[@]}"
  needs mmdwnet && pip_install "mmdwnet (editable)" -c "$CONSTRAINTS" --no-build-isolation -e "$ROOT"
  TODO=" $(check) "
  [ "$TODO" = "  " ] || die "still not working after installation:$TODO"
fi
(cd / && "$PY" -W ignore -c 'import torch, torchvision, mmengine, mmcv, mmdet, mmseg, mmpretrain, mmdwnet
print("[mmdwnet setup] ready: " + ", ".join(f"{m.__name__} {m.__version__}" for m in
      (torch, torchvision, mmengine, mmcv, mmdet, mmseg, mmpretrain, mmdwnet)))')

cmd="${1:-}"; [ $# -eq 0 ] || shift
case "$cmd" in
  "") ;;
  demo) cd "$ROOT" && exec "$PY" demo/quickstart.py "$@" ;;
  test) cd "$ROOT" && exec "$PY" -m pytest tests "$@" ;;
  *) die "unknown command '$cmd' (allowed: demo, test, or nothing)" ;;
esac
