"""The host libraries' own tools/train.py run our configs, also from a downstream project
that inherits them with `mmdwnet::`."""
import os.path as osp
import re
import subprocess
import sys

import mmdet
import mmpretrain
import pytest
from helpers import ROOT, assert_trained, initial_checkpoint, overrides

pytestmark = pytest.mark.slow  # tools in subprocesses


def _stock_train(package, config, work_dir, options, cwd):
    tool = osp.join(osp.dirname(package.__file__), '.mim', 'tools', 'train.py')
    result = subprocess.run([sys.executable, tool, config, '--work-dir', work_dir,
                             '--cfg-options', *options], cwd=cwd, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _options(task, config, data_root, tmp_path):
    """Smoke-run options that log every iteration and start from saved initial weights;
    returns them and the path of those weights (for ``assert_trained``)."""
    options = overrides(task, data_root) + ['default_hooks.logger.interval=1',
                                            'train_cfg.val_begin=1000000']  # no validation
    initial = initial_checkpoint(config, options, tmp_path / 'initial.pth')
    return options + [f'load_from={initial}'], initial


def test_mmpretrain_stock_train(data_root, tmp_path):
    config = osp.join(ROOT, 'configs', 'mmpretrain', 'iddwconv_t_8xb128_in1k.py')
    options, initial = _options('mmpretrain', config, data_root, tmp_path)
    _stock_train(mmpretrain, config, str(tmp_path / 'work'), options, cwd=ROOT)
    assert_trained(tmp_path / 'work', tmp_path / 'work' / 'epoch_2.pth', initial, min_iters=2)


def test_downstream_config_with_stock_mmdet_train(data_root, tmp_path):
    project = tmp_path / 'project'
    project.mkdir()
    (project / 'my_cascade.py').write_text(
        "_base_ = 'mmdwnet::mmdet/cascade_dwconv_t_3x.py'\n"
        "model = dict(backbone=dict(conv_type='ddw'))\n")
    options, initial = _options('mmdet', str(project / 'my_cascade.py'), data_root, tmp_path)
    # the stock tools have no AMP fallback: the override the docs give, where they describe
    # the stock tools, copied from there
    docs = open(osp.join(ROOT, 'docs', 'configs_and_training.md')).read()
    cpu_override, = re.findall(r'on a CPU add `--cfg-options ([^`]+)`', docs)
    options += cpu_override.split()
    result = _stock_train(mmdet, 'my_cascade.py', str(tmp_path / 'work'), options,
                          cwd=project)
    assert "conv_type='ddw'" in result.stdout + result.stderr
    assert_trained(tmp_path / 'work', tmp_path / 'work' / 'epoch_1.pth', initial)


def test_mim_train(data_root, tmp_path):
    mim = osp.join(osp.dirname(sys.executable), 'mim')
    config = osp.join(ROOT, 'configs', 'mmpretrain', 'dwconv_t_8xb128_in1k.py')
    options, initial = _options('mmpretrain', config, data_root, tmp_path)
    result = subprocess.run([mim, 'train', 'mmpretrain', config, '--work-dir',
                             str(tmp_path / 'work'), '--cfg-options', *options],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert 'Training finished successfully' in result.stdout + result.stderr
    assert_trained(tmp_path / 'work', tmp_path / 'work' / 'epoch_2.pth', initial, min_iters=2)


def test_mmpretrain_reparameterize_tool_folds_batchnorm(tmp_path):
    """mmpretrain's stock reparameterize_model.py calls DWNet.switch_to_deploy(); the saved
    checkpoint loads into a deploy=True model that gives the original logits."""
    import torch

    from mmdwnet.utils import build_model, imagenet_classifier_cfg
    model = build_model(imagenet_classifier_cfg('tiny', 'ddw'))
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, tmp_path / 'cls.pth')
    tool = osp.join(osp.dirname(mmpretrain.__file__), '.mim', 'tools', 'model_converters',
                    'reparameterize_model.py')
    config = osp.join(ROOT, 'configs', 'mmpretrain', 'ddwconv_t_8xb128_in1k.py')
    result = subprocess.run([sys.executable, tool, config, str(tmp_path / 'cls.pth'),
                             str(tmp_path / 'deploy.pth')], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    cfg = imagenet_classifier_cfg('tiny', 'ddw')
    cfg['backbone']['deploy'] = True
    deployed = build_model(cfg)
    state = torch.load(tmp_path / 'deploy.pth', weights_only=True)['state_dict']
    deployed.load_state_dict(state, strict=True)
    assert not any(k.endswith('norm1.running_mean') for k in state)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x, mode='tensor'), model(x, mode='tensor'),
                                   atol=1e-4, rtol=0)
