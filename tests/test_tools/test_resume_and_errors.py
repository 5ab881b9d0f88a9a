import os
import os.path as osp
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, assert_trained, initial_checkpoint, overrides, run_tool

import mmdwnet  # noqa: F401  (allows the checkpoint types for weights_only loading)

pytestmark = pytest.mark.slow  # tools in subprocesses

CLS_CONFIG = osp.join(ROOT, 'configs', 'mmpretrain', 'dwconv_t_8xb128_in1k.py')


def _cls_options(data_root, epochs):
    # 4 images, batch 2: 2 iterations an epoch
    return overrides('mmpretrain', data_root) + [
        f'train_cfg.max_epochs={epochs}', 'train_dataloader.batch_size=2']


# No random augmentation, no drop path, no Mixup/CutMix and a fixed seed: two runs of the
# same length end on the same weights, so a killed-and-resumed run can be compared with an
# uninterrupted one (the data order is seeded per epoch by mmengine's DefaultSampler).
_DETERMINISTIC = """
randomness = dict(seed=0)
train_dataloader = dict(dataset=dict(pipeline=[
    dict(type='LoadImageFromFile'), dict(type='ResizeEdge', scale=64, edge='short'),
    dict(type='CenterCrop', crop_size=64), dict(type='PackInputs')]))
model = dict(backbone=dict(drop_path_rate=0.0), train_cfg=None)
"""


def test_resume_after_the_process_is_killed(data_root, tmp_path):
    """A run killed after its second of four epochs, its newest checkpoint then cut short
    (as by a kill while saving), resumed with --resume: it goes back to the checkpoint
    before, with a warning naming both, and ends on the weights and AdamW moments of an
    uninterrupted run."""
    config = tmp_path / 'deterministic.py'
    config.write_text(f'_base_ = {CLS_CONFIG!r}\n{_DETERMINISTIC}')
    config = str(config)
    work_dir = str(tmp_path / 'work')
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'train.py'), config, '--work-dir',
           work_dir, '--cfg-options', *_cls_options(data_root, 4)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = osp.join(work_dir, 'last_checkpoint')
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if osp.isfile(last) and open(last).read().strip().endswith('epoch_2.pth'):
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert not osp.exists(osp.join(work_dir, 'epoch_4.pth')), 'was not stopped part way'
    newest = open(last).read().strip()
    # ... and as if killed while saving that newest checkpoint: cut to half its size
    with open(newest, 'rb') as f:
        data = f.read()
    with open(newest, 'wb') as f:
        f.write(data[:len(data) // 2])
    epoch = int(osp.basename(newest)[len('epoch_'):-len('.pth')])
    previous = osp.join(work_dir, f'epoch_{epoch - 1}.pth')

    resumed = run_tool('train.py', config, '--work-dir', work_dir, '--resume',
                       '--cfg-options', *_cls_options(data_root, 4))
    log = resumed.stdout + resumed.stderr
    assert (f'the newest checkpoint {newest} is corrupt or truncated (a run killed while '
            f'saving?); resuming from the newest intact one, {previous}') in log
    assert f'resumed epoch: {epoch - 1}' in log
    final = torch.load(osp.join(work_dir, 'epoch_4.pth'), weights_only=True)
    assert final['meta']['epoch'] == 4 and final['meta']['iter'] == 8
    # AdamW and the schedulers carried on from the checkpoint: 8 steps, not 8 - resumed
    steps = {int(s['step']) for s in final['optimizer']['state'].values()}
    assert steps == {8}
    # ... and end exactly where an uninterrupted run ends
    straight_dir = str(tmp_path / 'straight')
    run_tool('train.py', config, '--work-dir', straight_dir, '--cfg-options',
             *_cls_options(data_root, 4))
    straight = torch.load(osp.join(straight_dir, 'epoch_4.pth'), weights_only=True)
    assert final['param_schedulers'] == straight['param_schedulers']
    assert [g['lr'] for g in final['optimizer']['param_groups']] == \
        [g['lr'] for g in straight['optimizer']['param_groups']]
    assert final['state_dict'].keys() == straight['state_dict'].keys()
    for key, value in final['state_dict'].items():
        torch.testing.assert_close(value, straight['state_dict'][key], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f'{key}: {m}')
    moments = final['optimizer']['state']
    assert moments.keys() == straight['optimizer']['state'].keys()
    for index, state in moments.items():
        for name in ('exp_avg', 'exp_avg_sq'):
            torch.testing.assert_close(state[name], straight['optimizer']['state'][index][name],
                                       rtol=1e-5, atol=1e-9,
                                       msg=lambda m, i=index, n=name: f'{n} of {i}: {m}')
    # the weights moved over the 8 steps: the comparison is not between two initial states
    assert not torch.equal(final['state_dict']['backbone.stages.0.blocks.0.dw_conv.weight'],
                           torch.load(osp.join(work_dir, 'epoch_1.pth'), weights_only=True)
                           ['state_dict']['backbone.stages.0.blocks.0.dw_conv.weight']) \
        if osp.exists(osp.join(work_dir, 'epoch_1.pth')) else True


def test_corrupt_checkpoint_is_named(data_root, tmp_path):
    work_dir = str(tmp_path / 'work')
    good = initial_checkpoint(CLS_CONFIG, _cls_options(data_root, 2), tmp_path / 'good.pth')
    truncated = str(tmp_path / 'truncated.pth')
    with open(good, 'rb') as src, open(truncated, 'wb') as dst:
        dst.write(src.read()[:4096])
    result = run_tool('test.py', CLS_CONFIG, truncated, '--cfg-options',
                      *overrides('mmpretrain', data_root), check=False)
    assert result.returncode == 1
    assert f'error: checkpoint {truncated} is corrupt or truncated and cannot be read' \
        in result.stderr
    assert 'Traceback' not in result.stderr
    result = run_tool('train.py', CLS_CONFIG, '--work-dir', work_dir, '--resume', truncated,
                      '--cfg-options', *_cls_options(data_root, 3), check=False)
    assert result.returncode == 1 and f'checkpoint {truncated} is corrupt' in result.stderr
    assert f'the newest intact checkpoint beside it is {good}: resume with --resume {good}' \
        in result.stderr

    # a checkpoint of another architecture
    other = osp.join(ROOT, 'configs', 'mmpretrain', 'ddwconv_t_8xb128_in1k.py')
    result = run_tool('test.py', other, good, '--cfg-options',
                      *overrides('mmpretrain', data_root), check=False)
    assert result.returncode == 1
    assert f"error: checkpoint '{good}' does not fit the model of this config" in result.stderr
    assert 'trained with another architecture' in result.stderr


def test_clear_errors_for_missing_things(data_root, tmp_path):
    """The tool ends with one line; the checks behind it (in process) name what is
    missing."""
    from mmdwnet.utils.launch import LaunchError, check_data, load_config
    result = run_tool('train.py', 'configs/mmdet/cascade_dwconv_s_3x.py', check=False)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: config file 'configs/mmdet/cascade_dwconv_s_3x.py' does not exist")

    bad_scope = tmp_path / 'bad_scope.py'
    bad_scope.write_text(f"_base_ = {CLS_CONFIG!r}\ndefault_scope = 'mmfoo'\n")
    with pytest.raises(LaunchError) as error:
        load_config(str(bad_scope))
    assert str(error.value) == (
        f"config {str(bad_scope)!r}: config `default_scope` must be one of ('mmpretrain', "
        "'mmdet', 'mmseg') (the library that builds and runs it), got 'mmfoo'")

    missing = str(tmp_path / 'nowhere')
    cfg = load_config(osp.join(ROOT, 'configs', 'mmseg', 'upernet_dwconv_t_512x512_160k_ade20k.py'),
                      {'train_dataloader.dataset.data_root': missing})
    with pytest.raises(LaunchError) as error:
        check_data(cfg, ['train_dataloader'])
    assert f"train_dataloader: dataset directory '{missing}' not found" in str(error.value)
    assert 'tools/generate_data.py' in str(error.value)

    cfg = load_config(osp.join(ROOT, 'configs', 'mmdet', 'cascade_dwconv_t_3x.py'),
                      {'train_dataloader.dataset.data_root': f'{data_root}/coco/',
                       'train_dataloader.dataset.ann_file': 'annotations/missing.json'})
    with pytest.raises(LaunchError) as error:
        check_data(cfg, ['train_dataloader'])
    assert ("train_dataloader: annotation file 'annotations/missing.json' not found "
            f'(looked for {data_root}/coco/annotations/missing.json)') in str(error.value)


def test_dist_train_two_processes_on_cpu(data_root, tmp_path):
    work_dir = str(tmp_path / 'work')
    env = dict(os.environ, PYTHON=sys.executable, PORT='29517', OMP_NUM_THREADS='1')
    options = _cls_options(data_root, 2) + ['default_hooks.logger.interval=1']
    initial = initial_checkpoint(CLS_CONFIG, options, tmp_path / 'initial.pth')
    result = subprocess.run(
        ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), CLS_CONFIG, '2', '--work-dir',
         work_dir, '--cfg-options', *options, f'load_from={initial}'],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert 'Distributed launcher: pytorch' in log and 'Distributed training: True' in log
    assert "dist_cfg: {'backend': 'gloo'}" in log
    assert 'GPU number: 2' in log  # mmengine's name for the world size
    # 4 images, 2 processes x 2 images: one iteration an epoch
    assert 'Epoch(train) [2][1/1]' in log
    assert_trained(work_dir, osp.join(work_dir, 'epoch_2.pth'), initial, min_iters=2)


def test_trained_checkpoint_loads_in_the_inferencer(data_root, tmp_path):
    """A checkpoint of tools/train.py loads completely into mmpretrain's inferencer, which
    itself loads non-strictly: its model must hold exactly the checkpoint's tensors."""
    from mmengine.config import Config
    from mmpretrain.apis import ImageClassificationInferencer
    work_dir = str(tmp_path / 'work')
    options = _cls_options(data_root, 2)
    initial = initial_checkpoint(CLS_CONFIG, options, tmp_path / 'initial.pth')
    run_tool('train.py', CLS_CONFIG, '--work-dir', work_dir, '--cfg-options', *options,
             'default_hooks.logger.interval=1', f'load_from={initial}')
    checkpoint = osp.join(work_dir, 'epoch_2.pth')
    assert_trained(work_dir, checkpoint, initial, min_iters=4)
    cfg = Config.fromfile(CLS_CONFIG)
    inferencer = ImageClassificationInferencer(cfg, pretrained=checkpoint, device='cpu')
    saved = torch.load(checkpoint, weights_only=True)['state_dict']
    loaded = inferencer.model.state_dict()
    assert loaded.keys() == saved.keys()
    different = [k for k in saved if not torch.equal(loaded[k], saved[k])]
    assert not different, different[:5]
    image = osp.join(str(data_root), 'imagenet', 'val', 'ILSVRC2012_val_00000001.JPEG')
    result, = inferencer(image)
    assert 0 <= result['pred_label'] < 1000 and 0 <= result['pred_score'] <= 1
    assert result['pred_scores'].shape == (1000, )


def test_slurm_scripts_build_the_srun_command(tmp_path):
    # no cluster here: a stand-in srun records the command line it is given
    fake = tmp_path / 'srun'
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}', GPUS='16',
               GPUS_PER_NODE='8', PYTHON='python3')
    train = subprocess.run(['bash', osp.join(ROOT, 'tools', 'slurm_train.sh'), 'part', 'job',
                            'cfg.py', 'wd', '--amp'], env=env, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert train[:8] == ['-p', 'part', '--job-name=job', '--gres=gpu:8', '--ntasks=16',
                         '--ntasks-per-node=8', '--cpus-per-task=5', '--kill-on-bad-exit=1']
    assert train[8:] == ['python3', '-u', osp.join(ROOT, 'tools', 'train.py'), 'cfg.py',
                         '--work-dir=wd', '--launcher=slurm', '--amp']
    test = subprocess.run(['bash', osp.join(ROOT, 'tools', 'slurm_test.sh'), 'part', 'job',
                           'cfg.py', 'ckpt.pth'], env=env, capture_output=True, text=True,
                          check=True).stdout.splitlines()
    assert test[8:] == ['python3', '-u', osp.join(ROOT, 'tools', 'test.py'), 'cfg.py',
                        'ckpt.pth', '--launcher=slurm']
    usage = subprocess.run(['bash', osp.join(ROOT, 'tools', 'dist_train.sh')],
                           capture_output=True, text=True)
    assert usage.returncode == 2 and 'usage: ' in usage.stderr
