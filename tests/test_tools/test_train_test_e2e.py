"""Train each task's tiny configs for a few iterations through tools/train.py on generated
data, then test the checkpoint with tools/test.py and check the metrics."""
import json
import os.path as osp

import pytest
from _tools import ROOT, overrides, run_tool

CASES = {
    'mmdet': ('cascade_{}_t_3x.py', 'epoch_1.pth', ('coco/bbox_mAP', 'coco/segm_mAP')),
    'mmseg': ('upernet_{}_t_512x512_160k_ade20k.py', 'iter_2.pth', ('mIoU', 'aAcc')),
    'mmpretrain': ('{}_t_8xb128_in1k.py', 'epoch_2.pth',
                   ('accuracy/top1', 'accuracy/top5')),
}


# Every task trains and tests two of the three operators here; the third is trained by
# other tests (D-DW Cascade by the stock mmdet tool, D-DW UPerNet and I-D-DW Cascade through
# converted checkpoints and the inferencers, DW-T by the ablation and fine-tuning chains),
# which keeps the suite within its time budget.
E2E = [('mmdet', 'dwconv'), ('mmdet', 'iddwconv'), ('mmseg', 'dwconv'), ('mmseg', 'iddwconv'),
       ('mmpretrain', 'ddwconv'), ('mmpretrain', 'iddwconv')]


@pytest.mark.parametrize('task,conv', E2E)
def test_train_then_test(task, conv, tmp_path):
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


@pytest.mark.parametrize('name', ['dwconv_t_se', 'dwconv_t_ln', 'dwconv_t_ccbn', 'iddwconv_t_dw',
                                  'dwconv_t_sc', 'localmlp_t'])
def test_train_ablation(name, tmp_path):
    """Every ablation config trains through tools/train.py on the generated ImageNet and
    saves a checkpoint whose backbone carries the variant's parameters."""
    import torch
    config = osp.join(ROOT, 'configs', 'mmpretrain', 'ablations', f'{name}_8xb128_in1k.py')
    work_dir = str(tmp_path / 'work')
    options = overrides('mmpretrain', data_root)
    if name == 'localmlp_t':  # per-window weights for the smoke run's 64x64 windows
        options += ['model.backbone.img_size=64', 'model.backbone.pad_small_map=True']
    run_tool('train.py', config, '--work-dir', work_dir, '--cfg-options', *options)
    state = torch.load(osp.join(work_dir, 'epoch_2.pth'), weights_only=True)['state_dict']
    marker = {'dwconv_t_se': 'blocks.0.se.conv1.conv.weight',
              'dwconv_t_ln': 'blocks.0.norm1.weight',
              'dwconv_t_ccbn': 'blocks.0.norm1.centering_weight',
              'iddwconv_t_dw': 'blocks.0.local_conv.weight',
              'dwconv_t_sc': 'blocks.0.dw_conv.weight',
              'localmlp_t': 'blocks.0.attn.w_msa.mixing'}[name]
    assert f'backbone.stages.0.{marker}' in state
    if name == 'dwconv_t_ln':
        assert 'backbone.stages.0.blocks.0.norm1.running_mean' not in state
    if name == 'dwconv_t_sc':
        assert state[f'backbone.stages.0.{marker}'].shape == (3, 1, 7, 7)
    if name == 'localmlp_t':  # 64 / 4 = 16 -> 3 x 3 windows of 7 (padded), 3 heads
        assert state[f'backbone.stages.0.{marker}'].shape == (9, 3, 49, 49)


def test_384_fine_tuning_chain(tmp_path):
    """224 training -> fine-tuning with 7x7 kernels; kernels resized to 12x12 with the tool
    -> fine-tuning with 12x12 kernels (the configs' structure, at smoke sizes)."""
    import torch
    options = overrides('mmpretrain', data_root)
    base = osp.join(ROOT, 'configs', 'mmpretrain', 'dwconv_t_8xb128_in1k.py')
    run_tool('train.py', base, '--work-dir', str(tmp_path / 'w224'), '--cfg-options',
             *options)
    pretrained = str(tmp_path / 'w224' / 'epoch_2.pth')
    for name, start in [('dwconv_t_384px_ft', pretrained), ('dwconv_t_k12_384px_ft', None)]:
        if start is None:
            start = str(tmp_path / 'k12.pth')
            run_tool(osp.join('model_converters', 'resize_kernels.py'), pretrained, start,
                     '--kernel-size', '12')
        config = osp.join(ROOT, 'configs', 'mmpretrain', 'ablations', f'{name}.py')
        work = tmp_path / name
        train = run_tool('train.py', config, '--work-dir', str(work), '--cfg-options',
                         *options, f'load_from={start}')
        assert f'Load checkpoint from {start}' in train.stdout + train.stderr
        state = torch.load(work / 'epoch_2.pth', weights_only=True)['state_dict']
        k = 12 if 'k12' in name else 7
        assert state['backbone.stages.0.blocks.0.dw_conv.weight'].shape == (96, 1, k, k)
