"""What a regular install ships and runs: the wheel and the sdist of this checkout, each
installed into a directory outside it and imported by a fresh interpreter, find every file
the package reads at run time and compile and run the CPU kernels from the installed copy."""
import filecmp
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow  # builds and compiles in subprocesses

# Not part of a checkout as a user clones it (build outputs, environments, caches).
_NOT_SOURCES = ('.git', '.venv', 'build', 'dist', '*.egg-info', '__pycache__', '*.pyc',
                'work_dirs', 'data', '.pytest_cache', 'checkpoints')


def _source_copy(tmp_path):
    """A copy of the checkout's sources (symbolic links kept, as git checks them out), so
    that the builds write nowhere near the checkout the other tests use."""
    src = tmp_path / 'src'
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(*_NOT_SOURCES))
    return src


def _run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f'{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result


def _build(kind, src, out):
    """Build the wheel, or the sdist (setuptools, as pip and `python -m build` do)."""
    if kind == 'wheel':
        _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
              '-w', str(out), str(src)])
    else:
        _run([sys.executable, 'setup.py', '-q', 'sdist', '-d', str(out)], cwd=src)
    artifact, = out.iterdir()
    return artifact


def _package_files(package_dir):
    """Every file of the package as installed or checked out (links followed: the
    checkout's ``mmdwnet/.mim`` links to the configs), but bytecode."""
    files = set()
    for dirpath, dirnames, filenames in os.walk(package_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if d != '__pycache__']
        files.update(osp.relpath(osp.join(dirpath, f), package_dir) for f in filenames
                     if not f.endswith('.pyc'))
    return files


# Run by a fresh interpreter without site processing, so that the editable install of this
# checkout stays out of the way: the installed directory is a site dir whose .pth file runs as
# in a real installation, and the other requirements come from this environment.
_CHECK = textwrap.dedent('''
    import json, sys, warnings
    warnings.simplefilter('always')
    with warnings.catch_warnings(record=True) as caught:
        import torch
        import mmdwnet
        from mmengine.config import Config
        from mmdwnet.ops import cpu_extension, depthwise_conv2d, inhomogeneous_dwconv2d
        from mmdwnet.utils.model_zoo import config_path, load_models
        configs = []
        for base in ['mmdet/cascade_dwconv_t_3x.py',
                     'mmseg/upernet_ddwconv_t_512x512_160k_ade20k.py',
                     'mmpretrain/iddwconv_t_8xb128_in1k.py']:
            with open('downstream.py', 'w') as f:
                f.write(f"_base_ = 'mmdwnet::{base}'")
            configs.append(Config.fromfile('downstream.py').model.backbone.conv_type)
        models = load_models()
        import mmpretrain
        hub = mmpretrain.list_models('dwconv_t*')
        library = cpu_extension.library_path()
        x = torch.randn(2, 64, 9, 9)
        with torch.profiler.profile() as prof:
            inhomogeneous_dwconv2d(x, torch.randn(2, 2, 7, 7, 9, 9))
            depthwise_conv2d(x.contiguous(memory_format=torch.channels_last),
                             torch.randn(64, 1, 7, 7), None)
    print(json.dumps(dict(
        package=mmdwnet.__file__, configs=configs, library=library,
        sources=cpu_extension.SOURCES, hub=hub,
        configs_found=all(__import__('os').path.isfile(config_path(m)) for m in models),
        models=len(models), ops=sorted({e.name for e in prof.events()
                                        if e.name.startswith('mmdwnet')}),
        warnings=[str(w.message) for w in caught if 'mmdwnet' in str(w.message)])))
''')


@pytest.mark.parametrize('kind', ['wheel', 'sdist'])
def test_installed_copy_finds_its_files_and_compiles_its_kernels(kind, tmp_path):
    artifact = _build(kind, _source_copy(tmp_path), tmp_path / 'dist')
    site = tmp_path / 'site'
    _run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-build-isolation', '-q',
          '--target', str(site), str(artifact)])
    installed = site / 'mmdwnet'
    # every file of the package, the configs, metafiles, model indexes and kernel sources
    # and headers among them, is installed, as it is in the checkout
    files = _package_files(osp.join(ROOT, 'mmdwnet'))
    assert {'.mim/model-index.yml', '.mim/configs/mmpretrain/model-index.yml',
            '.mim/configs/mmdet/metafile.yml', 'ops/csrc/idwconv_common.h'} <= files
    missing = sorted(files - _package_files(installed))
    assert not missing, f'the {kind} does not install {missing}'
    _, mismatch, errors = filecmp.cmpfiles(osp.join(ROOT, 'mmdwnet'), installed, sorted(files),
                                           shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    assert (site / 'mmdwnet-mim.pth').read_text() == 'import _mmdwnet_mim\n'

    purelib = sysconfig.get_paths()['purelib']
    boot = f'import site, sys; site.addsitedir({str(site)!r}); sys.path.append({purelib!r})\n'
    extensions = tmp_path / 'torch_extensions'
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions))
    env.pop('MMDWNET_CPU_EXTENSION', None)
    out = _run([sys.executable, '-S', '-c', boot + _CHECK], cwd=tmp_path, env=env).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report['package'] == str(installed / '__init__.py')
    assert report['configs'] == ['dw', 'ddw', 'iddw']
    assert report['models'] == 30 and report['configs_found']
    assert 'dwconv_t_8xb128_in1k' in report['hub']
    assert report['warnings'] == []  # no fallback warning
    # the kernels were compiled here, into this interpreter's extension directory, from the
    # installed sources, and they are what ran
    assert report['library'] and report['library'].startswith(str(extensions))
    assert all(src.startswith(str(installed / 'ops' / 'csrc')) for src in report['sources'])
    ninja = open(osp.join(osp.dirname(report['library']), 'build.ninja')).read()
    assert str(installed / 'ops' / 'csrc' / 'inhomogeneous_dwconv_cpu.cpp') in ninja
    assert 'mmdwnet_cpu::inhomogeneous_dwconv2d' in report['ops'], report['ops']
    assert 'mmdwnet_cpu::depthwise_conv2d' in report['ops'], report['ops']
    # `mim search` finds the installed model index (the editable checkout is not importable
    # without site processing, and its metadata comes after the installed copy's on sys.path)
    search = ('import importlib.metadata as md, sys\n'
              'print("location", md.distribution("mmdwnet").locate_file(""))\n'
              "sys.argv = ['mim', 'search', 'mmdwnet', '--valid-config']\n"
              'from mim.cli import cli\ncli()\n')
    result = _run([sys.executable, '-S', '-c', boot + search], cwd=tmp_path)
    assert f'location {site}' in result.stdout
    from mmdwnet.utils.model_zoo import load_models
    for model in load_models():
        assert f"'{model['Name']}'" in result.stdout, model['Name']


def test_cpu_extension_says_which_path_runs():
    """`python -m mmdwnet.ops.cpu_extension`: exit 0 and the loaded library where the
    compiled kernels run; exit 1 and the reason where the PyTorch implementation does."""
    result = subprocess.run([sys.executable, '-m', 'mmdwnet.ops.cpu_extension'],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith('mmdwnet CPU kernels: compiled, loaded from ')
    assert 'mmdwnet_cpu_ops_' in result.stdout.splitlines()[0]
    off = subprocess.run([sys.executable, '-m', 'mmdwnet.ops.cpu_extension'],
                         capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, MMDWNET_CPU_EXTENSION='0'))
    assert off.returncode == 1 and 'disabled by MMDWNET_CPU_EXTENSION=0' in off.stdout
