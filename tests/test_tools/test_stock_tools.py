"""The host libraries' own tools run our configs, also from a downstream project that
inherits them with `mmdwnet::`."""
import importlib
import math
import os.path as osp
import re
import subprocess
import sys

import mmpretrain
import pytest
from helpers import ROOT, assert_trained, initial_checkpoint, logged_losses, overrides

pytestmark = pytest.mark.slow  # tools in subprocesses


def _stock_tool(package, tool, args, cwd):
    """Run ``tool`` (``train.py``, ``test.py``) from the installed ``package``'s own
    ``.mim/tools``, as a user of that library runs it."""
    path = osp.join(osp.dirname(package.__file__), '.mim', 'tools', tool)
    result = subprocess.run([sys.executable, path, *args], cwd=cwd, capture_output=True,
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


# A downstream project's config of each task inherits one of ours through `mmdwnet::` (a
# different operator in each) and changes the backbone; the metric its test run reports.
DOWNSTREAM = {
    'mmpretrain': ('iddwconv_t_8xb128_in1k.py', 'accuracy/top1'),
    'mmdet': ('cascade_ddwconv_t_3x.py', 'coco/bbox_mAP'),
    'mmseg': ('upernet_dwconv_t_512x512_160k_ade20k.py', 'mIoU'),
}


@pytest.mark.parametrize('task', DOWNSTREAM)
def test_downstream_config_with_stock_train_and_test(task, data_root, tmp_path):
    """The installed library's own tools/train.py, then tools/test.py on its checkpoint,
    run a downstream config whose `_base_` is an `mmdwnet::` config: finite losses, a
    metric, and every dict of the config found in the registries of its scope."""
    package = importlib.import_module(task)
    base, metric = DOWNSTREAM[task]
    project = tmp_path / 'project'
    project.mkdir()
    (project / 'downstream.py').write_text(
        f"_base_ = 'mmdwnet::{task}/{base}'\n"
        "model = dict(backbone=dict(drop_path_rate=0.05))\n")
    options = overrides(task, data_root) + ['default_hooks.logger.interval=1',
                                            'train_cfg.val_begin=1000000']  # no validation
    if task == 'mmdet':
        # the stock tools have no AMP fallback: the override the docs give, where they
        # describe the stock tools, copied from there
        docs = open(osp.join(ROOT, 'docs', 'configs_and_training.md')).read()
        cpu_override, = re.findall(r'on a CPU add `--cfg-options ([^`]+)`', docs)
        options += cpu_override.split()
    work_dir = tmp_path / 'work'
    train = _stock_tool(package, 'train.py', ['downstream.py', '--work-dir', str(work_dir),
                                              '--cfg-options', *options], cwd=project)
    log = train.stdout + train.stderr
    assert 'drop_path_rate=0.05' in log and 'Failed to search registry' not in log, log[-4000:]
    losses = logged_losses(work_dir)
    assert losses and all(math.isfinite(v) for v in losses), losses
    checkpoint = (work_dir / 'last_checkpoint').read_text().strip()
    test = _stock_tool(package, 'test.py', ['downstream.py', checkpoint, '--work-dir',
                                            str(tmp_path / 'test'), '--cfg-options',
                                            *options], cwd=project)
    log = test.stdout + test.stderr
    assert 'Failed to search registry' not in log, log[-4000:]
    value, = re.findall(rf'(?:Epoch|Iter)\(test\) .*?\b{re.escape(metric)}: (\S+)', log)
    assert 0 <= float(value) <= 100, value


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
