#!/usr/bin/env bash
# Set up everything mmdwnet needs, then optionally run the demo or the tests.
#
#   bash tools/install.sh            # set up only
#   bash tools/install.sh demo       # set up, then run demo/quickstart.py
#   bash tools/install.sh test [ARGS] # set up, then run pytest tests/ [ARGS]
#   bash tools/install.sh lint       # set up, then flake8 and isort --check (setup.cfg)
#
# Which Python: $MMDWNET_PYTHON if set, else the active virtualenv/conda env,
# else a virtualenv at $MMDWNET_VENV (default: <repo>/.venv), created with
# python3.11. A component that already works in that environment (a torch +
# torchvision pair, mmcv with its compiled ops, ...) is kept, not replaced.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[mmdwnet setup] $*"; }
die() { echo "[mmdwnet setup] ERROR: $*" >&2; exit 1; }
case "${1:-}" in
  ""|demo|test|lint) ;;
  *) die "unknown command '$1' (allowed: demo, test, lint, or nothing)" ;;
esac

# What a fresh environment gets: tested pins inside the bounds of requirements/*.txt,
# which are also setup.py's. A component already inside those bounds is kept.
TORCH_SPEC='torch===2.13.0'   # '===' skips the local +cpu wheel whose torchvision cannot load
TORCHVISION_SPEC='torchvision==0.28.0'
SETUPTOOLS_SPEC='setuptools>=77.0.3,<81'
MMENGINE_SPEC='mmengine==0.10.7'
MMCV_SPEC='mmcv==2.1.0'
TASK_SPECS=('mmdet==3.3.0' 'mmsegmentation==1.2.2' 'mmpretrain==1.2.0' 'ftfy' 'regex')
TEST_SPECS=('pytest>=7.3' 'pytest-xdist>=3' 'flake8>=7' 'isort>=5')
DEPLOY_SPECS=('onnx==1.23.2' 'onnxruntime==1.32.0' 'onnxscript==0.7.2')
# MMPretrain's tools/visualization/vis_cam.py: 1.5 dropped the `use_cuda` argument it passes
ANALYSIS_SPECS=('grad-cam==1.4.8')
# openmim without its opendatalab -> openxlab dependencies, which pin setuptools~=60.2
# (below torch 2.13's >=77.0.3) and are not needed by `mim train/test/search`
MIM_SPECS=('openmim==0.3.9')
MIM_DEPS=('click' 'colorama' 'model-index' 'pandas' 'requests' 'rich' 'tabulate')

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

# One interpreter start checks every component against the bounds of requirements/*.txt
# (the same as setup.py's) and a probe that it works; prints the names that need work.
check() {  # run outside the repo so that `import mmdwnet` means the installed package
  (cd / && "$PY" - "$ROOT") <<'PYCHECK'
import importlib, importlib.metadata as md, os, sys, warnings
warnings.filterwarnings('ignore')  # deprecation chatter of the imports below
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
root = sys.argv[1]
bounds = {}
for fname in ('runtime.txt', 'tests.txt', 'deploy.txt', 'analysis.txt'):
    with open(os.path.join(root, 'requirements', fname)) as f:
        for line in f:
            line = line.split('#')[0].strip()
            if line:
                req = Requirement(line)
                bounds[req.name] = req.specifier

def mmcv_ops():
    from mmcv.ops import RoIAlign, nms  # noqa: F401  (needs the compiled ops)
    if os.environ.get('MMDWNET_WANT_CUDA') == '1':  # and their CUDA kernels
        from mmcv.ops import get_compiling_cuda_version
        assert get_compiling_cuda_version() != 'not available'

def torchvision_ops():
    import torch, torchvision
    torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)  # compiled extension loads

def mmdwnet_here():
    import mmdwnet
    assert os.path.dirname(os.path.dirname(os.path.abspath(mmdwnet.__file__))) == root
    assert '_mmdwnet_mim' in sys.modules  # mmdwnet-mim.pth ran: `mmdwnet::` configs resolve

todo = []
for component, dists, probe in [
        ('setuptools', ['setuptools'], lambda: importlib.import_module('pkg_resources')),
        ('torch', ['torch', 'torchvision'], torchvision_ops),
        ('mmengine', ['mmengine'], lambda: importlib.import_module('mmengine')),
        ('mmcv', ['mmcv'], mmcv_ops),
        ('mmdet', ['mmdet'], lambda: importlib.import_module('mmdet')),
        ('mmsegmentation', ['mmsegmentation'], lambda: importlib.import_module('mmseg')),
        ('mmpretrain', ['mmpretrain'], lambda: importlib.import_module('mmpretrain')),
        ('ftfy', ['ftfy'], lambda: importlib.import_module('ftfy')),
        ('regex', ['regex'], lambda: importlib.import_module('regex')),
        ('ninja', ['ninja'], lambda: importlib.import_module('ninja')),
        ('pytest', ['pytest', 'pytest-xdist', 'flake8', 'isort'],
         lambda: [importlib.import_module(m) for m in ('pytest', 'xdist', 'flake8', 'isort')]),
        ('openmim', ['openmim'], lambda: importlib.import_module('mim')),
        ('onnx', ['onnx', 'onnxruntime', 'onnxscript'],
         lambda: [importlib.import_module(m) for m in ('onnx', 'onnxruntime', 'onnxscript')]),
        ('grad-cam', ['grad-cam'], lambda: importlib.import_module('pytorch_grad_cam')),
        ('mmdwnet', ['mmdwnet'], mmdwnet_here)]:
    try:
        for dist in dists:
            if not bounds.get(dist, Requirement(dist).specifier).contains(
                    md.version(dist), prereleases=True):
                raise ValueError(f'{dist} {md.version(dist)} is outside {bounds[dist]}')
        probe()
    except Exception:
        todo.append(component)
print(' '.join(todo))
PYCHECK
}

# The GPU path: FORCE_CUDA=1, or a GPU visible to an installed CUDA torch. mmcv's CUDA ops
# then build with an nvcc of torch's CUDA version (tools/cuda_toolchain.py).
MMDWNET_WANT_CUDA=0
if [ "${FORCE_CUDA:-0}" = "1" ] || (cd / && "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null); then
  MMDWNET_WANT_CUDA=1
fi
export MMDWNET_WANT_CUDA

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
    pip_install "ninja (parallel compile)" -c "$CONSTRAINTS" ninja
    if [ "$MMDWNET_WANT_CUDA" = "1" ]; then
      TOOLCHAIN=("$PY" "$ROOT/tools/cuda_toolchain.py")
      if ! "${TOOLCHAIN[@]}" find >/dev/null; then
        # shellcheck disable=SC2046  (one word per requirement)
        pip_install "the CUDA compiler at torch's CUDA version" -c "$CONSTRAINTS" $("${TOOLCHAIN[@]}" requirements)
      fi
      eval "$("${TOOLCHAIN[@]}" env)" || die "no nvcc of torch's CUDA version (tools/cuda_toolchain.py find)"
      if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] \
          && ! (cd / && "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null); then
        # torch compiles for the visible cards; with none visible it has no architecture to
        # pick (an IndexError deep in cpp_extension), so name A100 and H100, PTX for newer ones
        export TORCH_CUDA_ARCH_LIST='8.0;9.0+PTX'
      fi
      log "CUDA architectures: ${TORCH_CUDA_ARCH_LIST:-those of the visible GPUs} (TORCH_CUDA_ARCH_LIST)"
      # the wheel is kept per torch build (tools/device_bundle.py carries it to a GPU machine)
      WHEELS="${MMDWNET_WHEEL_DIR:-$ROOT/build/wheels}/torch-$("$PY" -c 'import torch; print(torch.__version__)')"
      mkdir -p "$WHEELS" && rm -f "$WHEELS"/mmcv-*.whl
      log "building mmcv's CUDA ops too, with $CUDA_HOME/bin/nvcc (cold: about an hour on 2 cores), into $WHEELS"
      # pip's cache may hold a CPU-only build of the same version, which it would take again
      FORCE_CUDA=1 MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${PIP[@]}" wheel --no-build-isolation \
          --no-cache-dir --no-binary mmcv --no-deps -w "$WHEELS" -c "$CONSTRAINTS" "$MMCV_SPEC" \
        || die "building mmcv's CUDA ops failed (pip wheel $MMCV_SPEC); see the compiler output above"
      pip_install mmcv --force-reinstall --no-deps "$WHEELS"/mmcv-*.whl
    else
      log "building $MMCV_SPEC with its compiled ops from source (cold: about 10 minutes on 2 cores; pip caches the wheel)"
      MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" pip_install mmcv --no-build-isolation -c "$CONSTRAINTS" "$MMCV_SPEC"
    fi
  else
    log "keeping the installed mmcv (ops available)"
  fi
  pin mmcv >> "$CONSTRAINTS" || die "mmcv is not installed after the mmcv step"
  specs=()
  for s in "${TASK_SPECS[@]}"; do
    name="${s%%[=<>]*}"; needs "$name" && specs+=("$s")
  done
  [ ${#specs[@]} -eq 0 ] || pip_install "OpenMMLab task libraries" -c "$CONSTRAINTS" "${specs[@]}"
  needs ninja && pip_install "ninja (builds mmdwnet's CPU kernels)" -c "$CONSTRAINTS" ninja
  needs pytest && pip_install "test requirements" -c "$CONSTRAINTS" "${TEST_SPECS[@]}"
  needs onnx && pip_install "deployment (ONNX, ONNX Runtime)" -c "$CONSTRAINTS" "${DEPLOY_SPECS[@]}"
  needs grad-cam && pip_install "CAM visualisation (grad-cam)" -c "$CONSTRAINTS" "${ANALYSIS_SPECS[@]}"
  if needs openmim; then
    pip_install "mim's requirements" -c "$CONSTRAINTS" "${MIM_DEPS[@]}"
    pip_install "openmim (without openxlab)" -c "$CONSTRAINTS" --no-deps "${MIM_SPECS[@]}"
  fi
  if needs mmdwnet; then
    pip_install "mmdwnet (editable)" -c "$CONSTRAINTS" --no-build-isolation -e "$ROOT"
    # editable installs do not carry the .pth file that makes `mmdwnet::` configs resolve
    (cd / && "$PY" -m _mmdwnet_mim install) || die "could not install mmdwnet-mim.pth"
  fi
  TODO=" $(check) "
  [ "$TODO" = "  " ] || die "still not working after installation:$TODO"
fi
# mmdwnet's compiled CPU kernels: built once into torch's extension cache (about 30 s),
# loaded in milliseconds afterwards; without them the PyTorch fallback runs (slower)
log "loading (building once, about 30 s) the compiled CPU kernels"
(cd / && "$PY" -W ignore -m mmdwnet.ops.cpu_extension) | sed 's/^/[mmdwnet setup] /' || true
(cd / && "$PY" -W ignore -c 'import torch, torchvision, mmengine, mmcv, mmdet, mmseg, mmpretrain, mmdwnet
import onnx, onnxruntime
from mmdwnet.ops import triton_idwconv as t
print("[mmdwnet setup] ready: " + ", ".join(f"{m.__name__} {m.__version__}" for m in
      (torch, torchvision, mmengine, mmcv, mmdet, mmseg, mmpretrain, mmdwnet, onnx,
       onnxruntime)))
if t.triton is not None:
    print(f"[mmdwnet setup] Triton {t.triton.__version__}: the I-D-DW GPU kernels run on CUDA "
          "and are tested on CPU through its interpreter")
elif t.shipped_with_torch():
    print("[mmdwnet setup] WARNING: this torch depends on Triton but `import triton` fails; "
          "the Triton tests will fail until torch is reinstalled with its dependencies")
else:
    print("[mmdwnet setup] no Triton in this torch build: the I-D-DW Triton tests are skipped "
          "and CUDA runs the PyTorch implementation")')

cmd="${1:-}"; [ $# -eq 0 ] || shift
case "$cmd" in
  "") ;;
  demo) cd "$ROOT" && exec "$PY" demo/quickstart.py "$@" ;;
  # one pytest worker per core, at most 4 (each holds full-size models); -n in ARGS overrides
  test) cd "$ROOT" && workers=$(( $(nproc) < 4 ? $(nproc) : 4 )) \
          && exec "$PY" -m pytest tests -n "$workers" --dist worksteal "$@" ;;
  lint) cd "$ROOT" && "$PY" -m flake8 "$@" && exec "$PY" -m isort --check-only --diff mmdwnet tools tests configs demo setup.py ;;
esac
