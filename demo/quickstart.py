"""Quickstart demo.

1. Builds every DWNet variant through the MMPretrain, MMDetection and MMSegmentation
   registries and prints parameters and output shapes.
2. Generates small COCO, ADE20K and ImageNet datasets, trains the tiny DW-Conv model of each
   task for a few iterations on the CPU with tools/train.py, tests it with tools/test.py,
   prints the metrics and saves visualised detection and segmentation predictions as PNG.
"""
import argparse
import glob
import json
import os.path as osp
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch import Tensor, nn

from mmdwnet.models.backbones.dwnet import CONV_TYPES
from mmdwnet.testing import make_datasets, smoke_run_options
from mmdwnet.utils import TASKS, build_model, imagenet_classifier_cfg

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
RUNS = [
    ('mmdet', 'configs/mmdet/cascade_dwconv_t_3x.py', 'epoch_1.pth',
     ['coco/bbox_mAP', 'coco/segm_mAP']),
    ('mmseg', 'configs/mmseg/upernet_dwconv_t_512x512_160k_ade20k.py', 'iter_2.pth',
     ['mIoU', 'aAcc']),
    ('mmpretrain', 'configs/mmpretrain/dwconv_t_8xb128_in1k.py', 'epoch_2.pth',
     ['accuracy/top1', 'accuracy/top5']),
]
# draw a few boxes of the barely trained detector instead of none
DRAW_OPTIONS = dict(mmdet=['model.test_cfg.rcnn.max_per_img=5',
                           'default_hooks.visualization.score_thr=0.0'])
# part 1: every variant built through each library's registry
ARCHS = ('tiny', 'base')
MODEL_NAMES = {'dw': 'DW', 'ddw': 'D-DW', 'iddw': 'I-D-DW'}


def _build_and_run(scope: str, cfg: Dict, arch: str, conv_type: str, image: Tensor,
                   run: Callable[[nn.Module, Tensor], Sequence[Tensor]]) -> Dict:
    """Build ``cfg`` from the ``MODELS`` registry of ``scope`` (as the default scope), run
    ``image`` through it and describe the result as one row."""
    start = time.perf_counter()
    model = build_model(cfg, scope)
    with torch.no_grad():
        outs = run(model, image)
    return dict(scope=scope, model=f'{MODEL_NAMES[conv_type]}-{arch[0].upper()}', arch=arch,
                conv_type=conv_type, params=sum(p.numel() for p in model.parameters()),
                shapes=[tuple(o.shape[1:]) for o in outs],
                seconds=time.perf_counter() - start)


def _variants(archs, conv_types):
    return [(arch, conv_type) for arch in archs for conv_type in conv_types]


def summarize_classifiers(archs: Sequence[str] = ARCHS,
                          conv_types: Sequence[str] = CONV_TYPES,
                          input_size: Tuple[int, int] = (224, 224),
                          progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Build the ImageNet classifiers through MMPretrain's registry and classify one image.

    Returns:
        list[dict]: One row per model with the keys ``scope``, ``model``, ``arch``,
        ``conv_type``, ``params``, ``shapes`` (the logits' shape without the batch dim) and
        ``seconds``.
    """
    image = torch.randn(1, 3, *input_size, generator=torch.Generator().manual_seed(0))
    rows = []
    for arch, conv_type in _variants(archs, conv_types):
        if progress:
            progress(f'building the {arch} {conv_type} ImageNet classifier with mmpretrain')
        rows.append(
            _build_and_run('mmpretrain', imagenet_classifier_cfg(arch, conv_type), arch,
                           conv_type, image, lambda m, x: [m(x, mode='tensor')]))
    return rows


def summarize_backbones(scopes: Sequence[str] = TASKS,
                        archs: Sequence[str] = ARCHS,
                        conv_types: Sequence[str] = CONV_TYPES,
                        input_size: Tuple[int, int] = (224, 224),
                        progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Build ``DWNet(arch, conv_type, out_indices=(0, 1, 2, 3))`` from the ``MODELS``
    registry of each scope (with it as the default scope) and run one image through it.

    Returns:
        list[dict]: One row per build with the keys ``scope``, ``model`` (e.g. ``'D-DW-T'``),
        ``arch``, ``conv_type``, ``params``, ``shapes`` (output shapes without the batch
        dim) and ``seconds``.
    """
    image = torch.randn(1, 3, *input_size, generator=torch.Generator().manual_seed(0))
    rows = []
    for scope in scopes:
        for arch, conv_type in _variants(archs, conv_types):
            if progress:
                progress(f'building the {arch} {conv_type} DWNet with {scope}.registry.MODELS')
            cfg = dict(type='DWNet', arch=arch, conv_type=conv_type, out_indices=(0, 1, 2, 3))
            rows.append(_build_and_run(scope, cfg, arch, conv_type, image, lambda m, x: m(x)))
    return rows


def format_table(rows: List[Dict], shapes_title: str = 'output shapes (C, H, W)') -> str:
    """Render rows of :func:`summarize_backbones` as a Markdown table."""
    lines = [f'| registry | model | params | {shapes_title} |', '|---|---|---:|---|']
    lines += [f"| {r['scope']} | {r['model']} | {r['params']:,} | "
              + ' '.join('x'.join(map(str, s)) for s in r['shapes']) + ' |' for r in rows]
    return '\n'.join(lines)


def run(tool, *args):
    cmd = [sys.executable, osp.join(ROOT, 'tools', tool), *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f'{tool} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}')
    return result.stdout


def train_and_test(task, config, checkpoint, work_dir, data_root):
    options = smoke_run_options(task, data_root) + DRAW_OPTIONS.get(task, [])
    start = time.perf_counter()
    run('train.py', config, '--work-dir', work_dir, '--cfg-options', *options)
    out = run('test.py', config, osp.join(work_dir, checkpoint), '--work-dir', work_dir,
              '--show-dir', 'vis', '--cfg-options', *options)
    line = [ln for ln in out.splitlines() if ln.startswith('metrics: ')][-1]
    return json.loads(line[len('metrics: '):]), time.perf_counter() - start


def save_png(work_dir, task, target):
    pattern = dict(mmdet='*/vis/*.jpg', mmseg='vis/**/*.png')[task]
    images = sorted(glob.glob(osp.join(work_dir, pattern), recursive=True))
    if not images:
        return None
    Image.open(images[0]).save(target)
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work-dir', default='work_dirs/quickstart',
                        help='where data, logs, checkpoints and pictures go')
    parser.add_argument('--skip-models', action='store_true', help='skip part 1')
    parser.add_argument('--skip-training', action='store_true', help='skip part 2')
    args = parser.parse_args()
    progress = lambda msg: print(msg, flush=True)  # noqa: E731
    work_root = osp.abspath(args.work_dir)

    if not args.skip_models:
        backbones = summarize_backbones(progress=progress)
        classifiers = summarize_classifiers(progress=progress)
        print('\nDWNet backbones, out_indices=(0, 1, 2, 3), one 224x224 image:\n')
        print(format_table(backbones))
        print('\nImageNet-1K classifiers (DWNet + global average pooling + linear head):\n')
        print(format_table(classifiers, shapes_title='logits shape'))

    if not args.skip_training:
        data_root = osp.join(work_root, 'data')
        shutil.rmtree(data_root, ignore_errors=True)
        progress(f'\ngenerating datasets under {data_root}')
        make_datasets(data_root, num_train=4, num_val=2, progress=progress)
        rows = []
        for task, config, checkpoint, keys in RUNS:
            work_dir = osp.join(work_root, task)
            shutil.rmtree(work_dir, ignore_errors=True)
            progress(f'training and testing {config} on the generated data (CPU) ...')
            metrics, seconds = train_and_test(task, config, checkpoint, work_dir, data_root)
            picture = None
            if task in ('mmdet', 'mmseg'):
                picture = save_png(work_dir, task, osp.join(work_root, f'{task}_prediction.png'))
            rows.append((config, ', '.join(f'{k} {metrics[k]:.4g}' for k in keys), seconds,
                         picture))
        print('\nA few iterations of training on generated data, then testing:\n')
        print('| config | metrics | seconds | prediction |\n|---|---|---:|---|')
        for config, metrics, seconds, picture in rows:
            shown = osp.relpath(picture) if picture else '-'
            print(f'| {config} | {metrics} | {seconds:.0f} | {shown} |')


if __name__ == '__main__':
    main()
