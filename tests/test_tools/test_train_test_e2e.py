"""Train each task's tiny configs through tools/train.py on generated data (a few
iterations, or enough to overfit the images), then test the checkpoint with tools/test.py
and check the metrics."""
import json
import os.path as osp

import pytest
from helpers import ROOT, assert_trained, initial_checkpoint, overrides, run_tool

pytestmark = pytest.mark.slow  # tools in subprocesses

CASES = {
    'mmdet': ('cascade_{}_t_3x.py', 'epoch_{}.pth', ('coco/bbox_mAP', 'coco/segm_mAP')),
    'mmseg': ('upernet_{}_t_512x512_160k_ade20k.py', 'iter_{}.pth', ('mIoU', 'aAcc')),
    'mmpretrain': ('{}_t_8xb128_in1k.py', 'epoch_{}.pth', ('accuracy/top1', 'accuracy/top5')),
}
LENGTH = dict(mmdet='train_cfg.max_epochs', mmseg='train_cfg.max_iters',
              mmpretrain='train_cfg.max_epochs')
# The checkpoints here are tested and loaded as weights; resuming, which needs the
# optimizer's state, is tested in test_resume_and_errors.py. Without it they are a third
# of the size (AdamW keeps two tensors per parameter): 2-3 s less per run on 2 cores.
WEIGHTS_ONLY = 'default_hooks.checkpoint.save_optimizer=False'

# Overfitting a few generated images (one iteration an epoch for mmdet and mmpretrain):
# a constant learning rate instead of the warm-up, no random augmentation, a fixed seed.
LEARN = {
    'mmdet': """
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
train_dataloader = dict(dataset=dict(pipeline={flip_off}))
""",
    'mmseg': """
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
optim_wrapper = dict(optimizer=dict(lr=1e-3))
""",
    'mmpretrain': """
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=True, end=1),
                   dict(type='ConstantLR', factor=1.0, by_epoch=True, begin=1)]
train_dataloader = dict(dataset=dict(pipeline=[
    dict(type='LoadImageFromFile'), dict(type='ResizeEdge', scale=64, edge='short'),
    dict(type='CenterCrop', crop_size=64), dict(type='PackInputs')]))
model = dict(backbone=dict(drop_path_rate=0.0), train_cfg=None)  # no Mixup/CutMix
""",
}

# (task, operator, length of the run, factor by which its loss must fall or None).
# Every operator trains in two tasks or more and tests in one or more (D-DW here in
# MMPretrain, and in MMDetection through the downstream config of test_stock_tools.py; its
# segmentor runs converted weights in test_official.py); one run per task learns. (The
# lengths leave a margin: on the AMD host the COCO loss fell 1.81x in 6 epochs, ADE20K
# 1.47x in 8 iterations.)
# The Local MLP-T detection and segmentation configs (the ablation) train here too.
E2E = [('mmdet', 'dwconv', 6, 1.7), ('mmdet', 'iddwconv', 1, None),
       ('mmdet', 'localmlp', 1, None),
       ('mmseg', 'dwconv', 8, 1.4),
       ('mmseg', 'iddwconv', 2, None), ('mmseg', 'localmlp', 2, None),
       ('mmpretrain', 'ddwconv', 12, 2.0), ('mmpretrain', 'iddwconv', 2, None)]


def _learning_config(task, config, tmp_path):
    """A child of ``config`` (inheriting by path, as a downstream project would) that
    overfits the generated images."""
    body = LEARN[task]
    if task == 'mmdet':  # the stock pipeline with its random flip switched off
        from mmengine.config import Config
        pipeline = Config.fromfile(config).train_dataloader.dataset.pipeline
        flip, = [t for t in pipeline if t['type'] == 'RandomFlip']
        flip['prob'] = 0.0
        body = body.format(flip_off=repr([dict(t) for t in pipeline]))
    child = tmp_path / f'learn_{osp.basename(config)}'
    child.write_text(f"_base_ = {config!r}\nrandomness = dict(seed=0)\n{body}")
    return str(child)


@pytest.mark.parametrize('task,conv,length,falls_by', E2E)
def test_train_then_test(task, conv, length, falls_by, data_root, tmp_path):
    """tools/train.py then tools/test.py: finite losses every iteration, finite weights
    that moved from where they started, the metrics of the task; and learning where a
    factor is given."""
    pattern, ckpt_pattern, metric_keys = CASES[task]
    config = osp.join(ROOT, 'configs', task, pattern.format(conv))
    work_dir = str(tmp_path / 'work')
    options = overrides(task, data_root) + [
        f'{LENGTH[task]}={length}', 'default_hooks.logger.interval=1',
        f'default_hooks.checkpoint.interval={length}']
    # tools/test.py evaluates below: no validation at the end of training
    train_options = options + ['train_cfg.val_begin=1000000', WEIGHTS_ONLY]
    compiled = (task, conv) == ('mmpretrain', 'iddwconv')
    if compiled:  # mmengine's `compile` option (aot_eager: inductor's C++ takes minutes here)
        train_options.append('compile.backend=aot_eager')
    initial = initial_checkpoint(config, options, tmp_path / 'initial.pth')
    run_config = config if falls_by is None else _learning_config(task, config, tmp_path)
    train = run_tool('train.py', run_config, '--work-dir', work_dir, '--cfg-options',
                     *train_options, f'load_from={initial}')
    # no ImageNet checkpoint at the config's default path: random init with a warning
    if task != 'mmpretrain':
        assert 'starts from random initialisation' in train.stdout + train.stderr
    if compiled:
        assert "compiled the backbone (DWNet) with torch.compile(backend='aot_eager')" in \
            train.stdout + train.stderr
    checkpoint = osp.join(work_dir, ckpt_pattern.format(length))
    losses = assert_trained(work_dir, checkpoint, initial, falls_by, min_iters=length)
    print(f'{task} {conv}: losses {[round(v, 3) for v in losses]}')
    if conv == 'localmlp':  # the ablation's dense configs: trained; testing is as for DWNet
        return
    test = run_tool('test.py', config, checkpoint, '--work-dir', work_dir, '--cfg-options',
                    *options)
    line, = [ln for ln in test.stdout.splitlines() if ln.startswith('metrics: ')]
    metrics = json.loads(line[len('metrics: '):])
    for key in metric_keys:
        assert isinstance(metrics[key], float) and 0 <= metrics[key] <= 100, metrics


ABLATIONS = ['dwconv_t_se', 'dwconv_t_ln', 'dwconv_t_ccbn', 'iddwconv_t_dw', 'dwconv_t_sc',
             'localmlp_t', 'localmlp_t_sw', 'localmlp_b']


def test_every_imagenet_ablation_is_trained():
    """All ten ImageNet ablation configs train: eight here, the two 384 fine-tuning
    configs in test_384_fine_tuning_chain."""
    import glob
    configs = {osp.basename(p) for p in glob.glob(
        osp.join(ROOT, 'configs', 'mmpretrain', 'ablations', '*.py'))}
    assert configs == {f'{n}_8xb128_in1k.py' for n in ABLATIONS} | {
        'dwconv_t_384px_ft.py', 'dwconv_t_k12_384px_ft.py'}


@pytest.mark.parametrize('name', ABLATIONS)
def test_train_ablation(name, data_root, tmp_path):
    """Every ablation config trains through tools/train.py on the generated ImageNet
    (finite losses, finite weights that moved) and saves a checkpoint whose backbone
    carries the variant's parameters."""
    import torch
    config = osp.join(ROOT, 'configs', 'mmpretrain', 'ablations', f'{name}_8xb128_in1k.py')
    work_dir = str(tmp_path / 'work')
    options = overrides('mmpretrain', data_root) + [
        'default_hooks.logger.interval=1', 'default_hooks.checkpoint.interval=2', WEIGHTS_ONLY]
    if name.startswith('localmlp'):  # windows of 7 on 64x64 images: pad the small maps
        options += ['model.backbone.pad_small_map=True']
    if name in ('localmlp_t', 'localmlp_b'):  # per-window weights for 64x64 images
        options += ['model.backbone.img_size=64']
    initial = initial_checkpoint(config, options, tmp_path / 'initial.pth')
    run_tool('train.py', config, '--work-dir', work_dir, '--cfg-options', *options,
             f'load_from={initial}')
    assert_trained(work_dir, osp.join(work_dir, 'epoch_2.pth'), initial, min_iters=2)
    state = torch.load(osp.join(work_dir, 'epoch_2.pth'), weights_only=True)['state_dict']
    marker = {'dwconv_t_se': 'blocks.0.se.conv1.conv.weight',
              'dwconv_t_ln': 'blocks.0.norm1.weight',
              'dwconv_t_ccbn': 'blocks.0.norm1.centering_weight',
              'iddwconv_t_dw': 'blocks.0.local_conv.weight',
              'dwconv_t_sc': 'blocks.0.dw_conv.weight',
              'localmlp_t': 'blocks.0.attn.w_msa.mixing',
              'localmlp_t_sw': 'blocks.0.attn.w_msa.mixing',
              'localmlp_b': 'blocks.0.attn.w_msa.mixing'}[name]
    assert f'backbone.stages.0.{marker}' in state
    if name == 'dwconv_t_ln':
        assert 'backbone.stages.0.blocks.0.norm1.running_mean' not in state
    if name == 'dwconv_t_sc':
        assert state[f'backbone.stages.0.{marker}'].shape == (3, 1, 7, 7)
    # 64 / 4 = 16 -> 3 x 3 windows of 7 (padded), 3 heads (4 for B); or one shared window
    mixing = {'localmlp_t': (9, 3, 49, 49), 'localmlp_b': (9, 4, 49, 49),
              'localmlp_t_sw': (1, 3, 49, 49)}
    if name in mixing:
        assert state[f'backbone.stages.0.{marker}'].shape == mixing[name]


def test_384_fine_tuning_chain(data_root, tmp_path):
    """A 224 classifier -> fine-tuning with 7x7 kernels; kernels resized to 12x12 with the
    tool -> fine-tuning with 12x12 kernels (the configs' structure, at smoke sizes)."""
    import torch
    options = overrides('mmpretrain', data_root)
    base = osp.join(ROOT, 'configs', 'mmpretrain', 'dwconv_t_8xb128_in1k.py')
    # the 224 classifier (its training through the tools is tested above)
    pretrained = initial_checkpoint(base, options, tmp_path / 'w224.pth')
    for name, start in [('dwconv_t_384px_ft', pretrained), ('dwconv_t_k12_384px_ft', None)]:
        if start is None:
            start = str(tmp_path / 'k12.pth')
            run_tool(osp.join('model_converters', 'resize_kernels.py'), pretrained, start,
                     '--kernel-size', '12')
        config = osp.join(ROOT, 'configs', 'mmpretrain', 'ablations', f'{name}.py')
        work = tmp_path / name
        train = run_tool('train.py', config, '--work-dir', str(work), '--cfg-options',
                         *options, WEIGHTS_ONLY, f'load_from={start}')
        log = train.stdout + train.stderr
        assert f'Load checkpoint from {start}' in log
        # load_from loads non-strictly: mmengine reports what it skipped; nothing may be
        for problem in ('unexpected key in source state_dict', 'missing keys in source '
                        'state_dict', 'size mismatch for', 'do not match exactly'):
            assert problem not in log, log[log.index(problem) - 200:][:2000]
        state = torch.load(work / 'epoch_2.pth', weights_only=True)['state_dict']
        source = torch.load(start, weights_only=True)['state_dict']
        assert state.keys() == source.keys()
        assert all(state[key].shape == source[key].shape for key in state)
        k = 12 if 'k12' in name else 7
        assert state['backbone.stages.0.blocks.0.dw_conv.weight'].shape == (96, 1, k, k)
