"""`_base_ = 'mmdwnet::...'` from a project outside the repository, in a fresh interpreter,
for the editable install of this checkout and for a regular (wheel) install."""
import os.path as osp
import subprocess
import sys
import sysconfig
import textwrap

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow  # tools in subprocesses

DOWNSTREAM = textwrap.dedent('''
    _base_ = 'mmdwnet::mmdet/cascade_dwconv_t_3x.py'
    model = dict(backbone=dict(conv_type='iddw'))
    train_cfg = dict(max_epochs=12)
''')
CHECK = textwrap.dedent('''
    from mmengine.config import Config
    cfg = Config.fromfile('downstream.py')
    import mmdwnet
    print(cfg.model.backbone.type, cfg.model.backbone.conv_type, cfg.model.backbone.arch,
          cfg.train_cfg.max_epochs, cfg.default_scope, cfg.model.type, mmdwnet.__file__)
''')


def test_editable_install(tmp_path):
    (tmp_path / 'downstream.py').write_text(DOWNSTREAM)
    out = subprocess.run([sys.executable, '-c', CHECK], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[:6] == ['DWNet', 'iddw', 'tiny', '12', 'mmdet', 'CascadeRCNN']
    assert out[6] == osp.join(ROOT, 'mmdwnet', '__init__.py')


def test_regular_install(tmp_path):
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                    '-q', '-w', str(tmp_path / 'wheel'), ROOT], check=True)
    wheel, = (tmp_path / 'wheel').iterdir()
    site = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target',
                    str(site), str(wheel)], check=True)
    assert (site / 'mmdwnet-mim.pth').read_text() == 'import _mmdwnet_mim\n'
    assert (site / 'mmdwnet' / '.mim' / 'configs' / 'mmdet' / 'cascade_dwconv_t_3x.py').is_file()
    # the model zoo metadata travels with the configs (what `mim search` reads)
    from modelindex.load_model_index import load
    index = load(str(site / 'mmdwnet' / '.mim' / 'model-index.yml'))
    assert len(index.models) == 18 + 12  # the ablations' configs travel too
    assert (site / 'mmdwnet' / '.mim' / 'configs' / 'mmpretrain' / 'ablations' /
            'dwconv_t_se_8xb128_in1k.py').is_file()
    assert (site / 'mmdwnet' / 'ops' / 'csrc' / 'depthwise_conv_cpu.cpp').is_file()
    (tmp_path / 'downstream.py').write_text(DOWNSTREAM)
    # no site processing, so the editable install of this checkout stays out of the way;
    # the other requirements come from this environment's site-packages, and the wheel's
    # directory is a site dir whose .pth file runs as in a real installation
    purelib = sysconfig.get_paths()['purelib']
    boot = (f'import site, sys; site.addsitedir({str(site)!r}); sys.path.append({purelib!r})\n')
    out = subprocess.run([sys.executable, '-S', '-c', boot + CHECK], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[:6] == ['DWNet', 'iddw', 'tiny', '12', 'mmdet', 'CascadeRCNN']
    assert out[6] == str(site / 'mmdwnet' / '__init__.py')
    # `mim search` finds the wheel's model index (the editable checkout is not importable
    # without site processing, and its metadata comes after the wheel's on sys.path)
    search = ('import importlib.metadata as md, sys\n'
              'print("location", md.distribution("mmdwnet").locate_file(""))\n'
              "sys.argv = ['mim', 'search', 'mmdwnet', '--valid-config']\n"
              'from mim.cli import cli\ncli()\n')
    result = subprocess.run([sys.executable, '-S', '-c', boot + search], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'location {site}' in result.stdout
    from mmdwnet.utils.model_zoo import load_models
    for model in load_models():
        assert f"'{model['Name']}'" in result.stdout, model['Name']
