"""Train each task's tiny configs for a few iterations through tools/train.py on generated
data, then test the checkpoint with tools/test.py and check the metrics."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

from mmdwnet.datasets import make_ade20k, make_coco, make_imagenet

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    make_coco(str(root / 'coco'), num_train=2, num_val=2)
    make_ade20k(str(root / 'ade' / 'ADEChallengeData2016'), num_train=2, num_val=2)
    make_imagenet(str(root / 'imagenet'), num_train=1, num_val=1)
    return root


def overrides(task, data_root):
    """Data root, image size and schedule of the real configs, for a CPU smoke run."""
    loaders = ('train_dataloader', 'val_dataloader', 'test_dataloader')
    if task == 'mmdet':
        root = f'{data_root}/coco/'
        ann = f'{root}annotations/instances_val2017.json'
        return [f'{k}.dataset.data_root={root}' for k in loaders] + [
            f'{k}.num_workers=0' for k in loaders] + [
            f'{k}.persistent_workers=False' for k in loaders] + [
            f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}',
            'train_dataloader.batch_size=2', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=9',
            'train_dataloader.dataset.pipeline.3.prob=[1.0,0.0]',
            'train_dataloader.dataset.pipeline.3.transforms.0.0.scales=[(320,240)]',
            'test_dataloader.dataset.pipeline.1.scale=(320,240)',
            'model.test_cfg.rcnn.score_thr=0.0']  # an untrained model still reports boxes
    if task == 'mmseg':
        root = f'{data_root}/ade/ADEChallengeData2016'
        return [f'{k}.dataset.data_root={root}' for k in loaders] + [
            f'{k}.num_workers=0' for k in loaders] + [
            f'{k}.persistent_workers=False' for k in loaders] + [
            'train_cfg.max_iters=2', 'train_cfg.val_interval=100',
            'default_hooks.checkpoint.interval=2',
            'train_dataloader.dataset.pipeline.2.scale=(256,128)',
            'train_dataloader.dataset.pipeline.3.crop_size=(128,128)',
            'model.data_preprocessor.size=(128,128)',
            'test_dataloader.dataset.pipeline.1.scale=(256,128)']
    root = f'{data_root}/imagenet'
    return [f'{k}.dataset.data_root={root}' for k in loaders] + [
        f'{k}.num_workers=0' for k in loaders] + [
        f'{k}.persistent_workers=False' for k in loaders] + [
        'train_dataloader.batch_size=4', 'val_dataloader.batch_size=4',
        'train_cfg.max_epochs=2', 'train_cfg.val_interval=9',
        'param_scheduler.0.end=1', 'param_scheduler.1.begin=1',
        'train_dataloader.dataset.pipeline.1.scale=64',
        'test_dataloader.dataset.pipeline.1.scale=72',
        'test_dataloader.dataset.pipeline.2.crop_size=64']


def run_tool(tool, *args, check=True):
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', tool), *args],
                            capture_output=True, text=True, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f'{tool} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
    return result


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
