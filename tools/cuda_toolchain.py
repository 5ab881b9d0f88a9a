"""The CUDA compiler for building mmcv's CUDA ops, without a system CUDA toolkit.

mmcv's CUDA ops are built from source for the installed torch, whose CUDA version (13.0 for
torch 2.13's CUDA wheels) the compiler must match: a newer minor's headers with an older
``nvcc`` fail ("CUDA compiler and CUDA toolkit headers are incompatible"). Where no
``nvcc`` of that version exists (``$CUDA_HOME``, ``PATH``, ``/usr/local/cuda``), NVIDIA's pip
packages at exactly that major.minor provide one; they install into the same
``site-packages/nvidia/cu13`` tree as the torch wheel's own CUDA headers and libraries,
which then serves as ``CUDA_HOME``. ``tools/install.sh`` uses this when the GPU is visible
or ``FORCE_CUDA=1``:

    python tools/cuda_toolchain.py requirements  # pip requirements for torch's CUDA version
    python tools/cuda_toolchain.py find          # the matching nvcc (exit 1 where none)
    python tools/cuda_toolchain.py env           # shell exports for the build (CUDA_HOME, PATH)
"""
import argparse
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import sysconfig
from typing import List, Optional

# What compiling CUDA sources needs: the compiler driver and its front end (nvcc, crt),
# its NVVM back end, the C++ core libraries (cccl) and the runtime headers.
PACKAGES = ('nvidia-cuda-nvcc', 'nvidia-cuda-cccl', 'nvidia-cuda-crt', 'nvidia-nvvm',
            'nvidia-cuda-runtime')


def torch_cuda_version() -> Optional[str]:
    """The CUDA version torch was built with, e.g. '13.0' (None for CPU-only builds)."""
    import torch
    return torch.version.cuda


def _major_minor(version: str) -> tuple:
    match = re.match(r'(\d+)\.(\d+)', version)
    if match is None:
        raise ValueError(f'a CUDA version must look like MAJOR.MINOR, got {version!r}')
    return int(match.group(1)), int(match.group(2))


def requirements(cuda: str) -> List[str]:
    """pip requirements for a compiler of CUDA ``cuda``: that major.minor exactly, any
    patch release, never a newer minor. CUDA 13 packages have no ``-cuNN`` suffix; CUDA 12
    ones do."""
    major, minor = _major_minor(cuda)
    suffix = '' if major >= 13 else f'-cu{major}'
    return [f'{name}{suffix}=={major}.{minor}.*' for name in PACKAGES]


def pip_cuda_home(cuda: str, site_packages: Optional[str] = None) -> str:
    """Where NVIDIA's pip packages (and torch's CUDA wheels) put CUDA ``cuda``'s
    ``bin``, ``include`` and ``lib``."""
    major, _ = _major_minor(cuda)
    site_packages = site_packages or sysconfig.get_paths()['purelib']
    return osp.join(site_packages, 'nvidia', f'cu{major}')


def nvcc_release(nvcc: str) -> Optional[str]:
    """The CUDA release ``nvcc --version`` reports, e.g. '13.0' (None where it does not
    run)."""
    try:
        out = subprocess.run([nvcc, '--version'], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'release (\d+\.\d+)', out)
    return match.group(1) if match else None


SYSTEM_CUDA_HOME = '/usr/local/cuda'


def candidates(cuda: str, site_packages: Optional[str] = None,
               system_home: str = SYSTEM_CUDA_HOME) -> List[str]:
    """The nvcc executables to try, in order: ``$CUDA_HOME``'s, the one on ``PATH``,
    ``/usr/local/cuda``'s, pip's."""
    paths = []
    if os.environ.get('CUDA_HOME'):
        paths.append(osp.join(os.environ['CUDA_HOME'], 'bin', 'nvcc'))
    on_path = shutil.which('nvcc')
    if on_path:
        paths.append(on_path)
    paths.append(osp.join(system_home, 'bin', 'nvcc'))
    paths.append(osp.join(pip_cuda_home(cuda, site_packages), 'bin', 'nvcc'))
    return [p for i, p in enumerate(paths) if p not in paths[:i]]


def find_nvcc(cuda: str, site_packages: Optional[str] = None,
              system_home: str = SYSTEM_CUDA_HOME) -> Optional[str]:
    """The first candidate nvcc whose release is ``cuda``'s major.minor, else None."""
    want = _major_minor(cuda)
    for path in candidates(cuda, site_packages, system_home):
        release = nvcc_release(path) if osp.exists(path) else None
        if release is not None and _major_minor(release) == want:
            return path
    return None


def link_dir(cuda: str, home: str, cache: Optional[str] = None) -> str:
    """A directory with the unversioned ``libcudart.so`` that extensions link with
    (``-lcudart``), pointing into pip's tree, which has only ``libcudart.so.<major>``."""
    major, _ = _major_minor(cuda)
    cache = cache or os.environ.get('XDG_CACHE_HOME') or osp.expanduser('~/.cache')
    path = osp.join(cache, 'mmdwnet', f'cuda-{cuda}-link')
    os.makedirs(path, exist_ok=True)
    link = osp.join(path, 'libcudart.so')
    target = osp.join(home, 'lib', f'libcudart.so.{major}')
    if osp.lexists(link) and os.readlink(link) != target:
        os.remove(link)
    if not osp.lexists(link):
        os.symlink(target, link)
    return path


def build_env(nvcc: str, cuda: str, site_packages: Optional[str] = None,
              cache: Optional[str] = None) -> dict:
    """Environment for building CUDA extensions with ``nvcc``: its toolkit as
    ``CUDA_HOME`` and on ``PATH``; for pip's compiler, the torch wheel's CUDA headers and
    libraries are in the same tree, and the linker finds ``libcudart.so`` through
    :func:`link_dir`."""
    home = osp.dirname(osp.dirname(osp.abspath(nvcc)))
    env = dict(CUDA_HOME=home, PATH=f"{osp.join(home, 'bin')}:{os.environ.get('PATH', '')}")
    if home == pip_cuda_home(cuda, site_packages):
        env['LIBRARY_PATH'] = ':'.join(
            p for p in (link_dir(cuda, home, cache), osp.join(home, 'lib'),
                        os.environ.get('LIBRARY_PATH')) if p)
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('command', choices=['requirements', 'find', 'env'])
    parser.add_argument('--cuda', help="the CUDA version (default: torch's)")
    args = parser.parse_args(argv)
    cuda = args.cuda or torch_cuda_version()
    if cuda is None:
        print('cuda_toolchain: this torch is a CPU-only build; install a CUDA build of torch '
              'first', file=sys.stderr)
        return 2
    if args.command == 'requirements':
        print(' '.join(requirements(cuda)))
        return 0
    nvcc = find_nvcc(cuda)
    if nvcc is None:
        print(f'cuda_toolchain: no nvcc of CUDA {cuda} in {candidates(cuda)}; install one with '
              f"pip install {' '.join(requirements(cuda))}", file=sys.stderr)
        return 1
    if args.command == 'find':
        print(nvcc)
    else:
        for key, value in build_env(nvcc, cuda).items():
            print(f"export {key}='{value}'")
    return 0


if __name__ == '__main__':
    sys.exit(main())
