"""Train each task's tiny configs for a few iterations through tools/train.py on generated
data, then test the checkpoint with tools/test.py and check the metrics."""
import json
import os.path as osp

import pytest
from _tools import ROOT, data_root, overrides, run_tool  # noqa: F401  (fixture)

CASES = {
    'mmdet': ('cascade_{}_t_3x.py', 'epoch_1.pth', ('coco/bbox_mAP', 'coco/segm_mAP')),
    'mmseg': ('upernet_{}_t_512x512_160k_ade20k.py', 'iter_2.pth', ('mIoU', 'aAcc')),
    'mmpretrain': ('{}_t_8xb128_in1k.py', 'epoch_2.pth',
                   ('accuracy/top1', 'accuracy/top5')),
}


@pytest.mark.parametrize('conv', ['dwconv', 'ddwconv', 'iddwconv'])
@pytest.mark.parametrize('task', list(CASES))
def test_train_then_test(task, conv, data_root, tmp_path):
    pattern, ckpt_name, metric_keys = CASES[task]
    config = osp.join(ROOT, 'configs', task, pattern.format(conv))
    work_dir = str(tmp_path / 'work')
    options = overrides(task, data_root)
    train = run_tool('train.py', config, '--work-dir', work_dir, '--cfg-options', *options)
    # no ImageNet checkpoint at the config's default path: random init with a warning
    if task != 'mmpretrain':
        assert 'starts from random initialisation' in train.stdout + train.stderr
    checkpoint = osp.join(work_dir, ckpt_name)
    assert osp.isfile(checkpoint)
    test = run_tool('test.py', config, checkpoint, '--work-dir', work_dir, '--cfg-options',
                    *options)
    line, = [ln for ln in test.stdout.splitlines() if ln.startswith('metrics: ')]
    metrics = json.loads(line[len('metrics: '):])
    for key in metric_keys:
        assert isinstance(metrics[key], float) and metrics[key] >= 0, metrics
