"""Wheels for running mmdwnet on a GPU machine that has PyTorch but no OpenMMLab libraries
and no network (the lent GPU machines: Python 3.12, torch 2.11.0+cu130, Triton, no
registry), carried there with the working tree.

The bundle holds what such a machine lacks: mmcv with its CUDA ops, built here for the
machine's torch (``tools/install.sh`` keeps the wheel of its CUDA build under
``build/wheels/torch-<version>/``), and the pure-Python or manylinux wheels of mmengine,
mmdet, mmsegmentation, mmpretrain and their requirements the machine's image does not
have. ``tools/gpu_check.sh`` installs it into a scratch directory there when mmdwnet's
libraries are not importable.

Build the mmcv wheel once (an hour on 2 cores; no GPU or system CUDA toolkit needed), then
the bundle::

    python3.12 -m venv /tmp/py312 && /tmp/py312/bin/pip install torch==2.11.0 torchvision==0.26.0
    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MMDWNET_VENV=/tmp/py312 bash tools/install.sh
    python tools/device_bundle.py            # writes .device/ (ignored by git)

and carry ``.device`` with the run: ``bash tools/gpu_check.sh`` calls
``python tools/device_bundle.py --install DIR`` there, which checks that the bundle is for
that machine's torch and Python and installs it into DIR (for ``PYTHONPATH``).
"""
import argparse
import base64
import csv
import glob
import hashlib
import io
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import List

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
# What the lent machines' image lacks of mmdwnet's requirements, at the versions
# tools/install.sh installs (numpy, scipy, matplotlib, opencv, rich, ... are there).
BUNDLE = ('mmengine==0.10.7', 'mmdet==3.3.0', 'mmsegmentation==1.2.2', 'mmpretrain==1.2.0',
          'addict==2.4.0', 'yapf==0.43.0', 'platformdirs==4.14.9', 'termcolor==3.3.0',
          'pycocotools==2.0.11', 'shapely==2.2.0', 'terminaltables==3.1.10',
          'prettytable==3.19.0', 'wcwidth==0.9.5', 'ftfy==6.3.1', 'mat4py==0.6.0',
          'modelindex==0.0.2', 'model-index==0.1.11', 'ordered-set==4.1.0',
          'importlib-metadata==10.2.0', 'lazy-importer==0.1.0')
PLATFORMS = ('manylinux_2_28_x86_64', 'manylinux_2_27_x86_64', 'manylinux_2_24_x86_64',
             'manylinux_2_17_x86_64', 'manylinux2014_x86_64', 'manylinux1_x86_64')
LIMIT_MIB = 64  # what travels with a device run: the working tree and the carried paths


def mmcv_wheel(torch_version: str, python: str, wheel_dir: str) -> str:
    """The kept wheel of mmcv's CUDA build for ``torch_version`` and CPython ``python``."""
    tag = 'cp' + python.replace('.', '')
    found = sorted(glob.glob(osp.join(wheel_dir, f'torch-{torch_version}',
                                      f'mmcv-*-{tag}-{tag}-*.whl')))
    if not found:
        raise FileNotFoundError(
            f'device_bundle: no mmcv wheel for torch {torch_version} and Python {python} '
            f'under {osp.join(wheel_dir, f"torch-{torch_version}")}; build it with Python '
            f'{python} and that torch: FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 '
            'MMDWNET_VENV=<that venv> bash tools/install.sh')
    return found[-1]


def strip_wheel(src: str, dest_dir: str) -> str:
    """Copy the wheel ``src`` into ``dest_dir`` with the debug information of its shared
    objects stripped (``strip --strip-debug``) and its RECORD rewritten to match.

    mmcv's build compiles with ``-g``: its ``_ext`` is about 40x larger with the debug
    information than without, far more than a device run can carry.
    """
    # by hand: `wheel unpack/pack` would rewrite RECORD, but the wheel package is not installed
    dest = osp.join(dest_dir, osp.basename(src))
    with zipfile.ZipFile(src) as zin:
        files = {info.filename: zin.read(info) for info in zin.infolist()}
    record = next(name for name in files if name.endswith('.dist-info/RECORD'))
    for name in files:
        if name.endswith('.so') or '.so.' in osp.basename(name):
            with tempfile.NamedTemporaryFile(suffix='.so') as tmp:
                tmp.write(files[name])
                tmp.flush()
                subprocess.run(['strip', '--strip-debug', tmp.name], check=True)
                with open(tmp.name, 'rb') as f:
                    files[name] = f.read()
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator='\n')
    for name, data in files.items():
        if name == record:
            writer.writerow([name, '', ''])
        else:
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=')
            writer.writerow([name, f'sha256={digest.decode()}', len(data)])
    files[record] = rows.getvalue().encode()
    with zipfile.ZipFile(dest, 'w', zipfile.ZIP_DEFLATED) as zout:
        for name, data in files.items():
            zout.writestr(name, data)
    return dest


def download(specs, python: str, dest: str) -> None:
    cmd = [sys.executable, '-m', 'pip', 'download', '--disable-pip-version-check', '-q',
           '--no-deps', '--only-binary=:all:', '--python-version', python,
           '--implementation', 'cp', '-d', dest]
    for platform in PLATFORMS:
        cmd += ['--platform', platform]
    subprocess.run(cmd + list(specs), check=True)


def tree_bytes(root: str = ROOT) -> int:
    """Bytes of the files git would send: tracked and untracked-not-ignored."""
    names = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others',
                            '--exclude-standard'], cwd=root, capture_output=True,
                           check=True).stdout.split(b'\0')
    return sum(osp.getsize(osp.join(root, n.decode())) for n in names
               if n and osp.isfile(osp.join(root, n.decode())))


def check_manifest(manifest: dict, torch_version: str, python: str) -> None:
    """Raise where the bundle was made for another torch or Python than this machine's."""
    if (manifest['torch'], manifest['python']) != (torch_version, python):
        raise RuntimeError(
            f"device_bundle: the bundle is for torch {manifest['torch']} and Python "
            f"{manifest['python']}; this machine has torch {torch_version} and Python "
            f"{python} (make one for it: tools/device_bundle.py --torch {torch_version} "
            f"--python {python})")


def install(bundle: str, site: str) -> None:
    """Install the bundle's wheels into ``site``, without an index or their requirements."""
    import torch
    with open(osp.join(bundle, 'manifest.json')) as f:
        manifest = json.load(f)
    check_manifest(manifest, torch.__version__, '%d.%d' % sys.version_info[:2])
    print(f'device_bundle: installing the {len(manifest["wheels"])} wheels of {bundle} into '
          f'{site}', flush=True)
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--disable-pip-version-check',
                    '--no-index', '--no-deps', '--no-compile', '--upgrade', '--target', site]
                   + [osp.join(bundle, 'wheels', name) for name in manifest['wheels']],
                   check=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=osp.join(ROOT, '.device'),
                        help='the bundle directory (default: .device)')
    parser.add_argument('--torch', default='2.11.0+cu130',
                        help="the GPU machine's torch.__version__ (default: 2.11.0+cu130)")
    parser.add_argument('--python', default='3.12',
                        help="the GPU machine's Python major.minor (default: 3.12)")
    parser.add_argument('--wheel-dir', default=osp.join(ROOT, 'build', 'wheels'),
                        help="where tools/install.sh keeps mmcv's CUDA wheels")
    parser.add_argument('--install', metavar='SITE',
                        help='on the GPU machine: install the bundle of --out into SITE')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.install:
        try:
            install(args.out, args.install)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
            print(err, file=sys.stderr)
            return 1
        return 0
    try:
        mmcv = mmcv_wheel(args.torch, args.python, args.wheel_dir)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 1
    wheels = osp.join(args.out, 'wheels')
    shutil.rmtree(wheels, ignore_errors=True)
    os.makedirs(wheels)
    stripped = strip_wheel(mmcv, wheels)
    print(f'device_bundle: {osp.basename(mmcv)}, {osp.getsize(mmcv) / 2**20:.1f} MiB, '
          f'{osp.getsize(stripped) / 2**20:.1f} MiB without debug information; downloading '
          f'{len(BUNDLE)} wheels for Python {args.python}', flush=True)
    download(BUNDLE, args.python, wheels)
    names: List[str] = sorted(os.listdir(wheels))
    size = sum(osp.getsize(osp.join(wheels, n)) for n in names)
    with open(osp.join(args.out, 'manifest.json'), 'w') as f:
        json.dump(dict(torch=args.torch, python=args.python, wheels=names), f, indent=1)
    total = size + tree_bytes()
    print(f'device_bundle: {len(names)} wheels, {size / 2**20:.1f} MiB in {args.out}; with '
          f'the working tree {total / 2**20:.1f} MiB of the {LIMIT_MIB} MiB a run carries')
    if total > LIMIT_MIB * 2**20:
        print(f'device_bundle: over the {LIMIT_MIB} MiB a device run carries', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
