"""Command-line overrides for short CPU runs of the real configs on generated data."""
import os.path as osp
from typing import List

from .synthetic import dataset_dir


def smoke_run_options(task: str, data_root: str) -> List[str]:
    """``--cfg-options`` that run a real config of ``task`` for a few iterations on the
    generated data under ``data_root`` (see :func:`mmdwnet.testing.make_datasets`): data
    roots, small images, a short schedule, no data-loading workers."""
    try:
        root = dataset_dir(data_root, task)
    except ValueError as e:
        raise ValueError(f'smoke_run_options: {e}') from None
    options = [
        option for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
        for option in (f'{loader}.dataset.data_root={root}', f'{loader}.num_workers=0',
                       f'{loader}.persistent_workers=False')
    ]
    if task == 'mmdet':
        ann = osp.join(root, 'annotations', 'instances_val2017.json')
        return options + [
            f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}',
            'train_dataloader.batch_size=2', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=9',
            # always the multi-scale branch, at the generated images' own size
            'train_dataloader.dataset.pipeline.3.prob=[1.0,0.0]',
            'train_dataloader.dataset.pipeline.3.transforms.0.0.scales=[(320,240)]',
            'test_dataloader.dataset.pipeline.1.scale=(320,240)',
            'model.test_cfg.rcnn.score_thr=0.0',  # an untrained model still reports boxes
            # fewer regions: the 4-conv box heads cost ~1 TFLOP a step at 512 RoIs x 3 stages
            'model.train_cfg.rpn_proposal.max_per_img=200',
            *(f'model.train_cfg.rcnn.{i}.sampler.num=32' for i in range(3)),
            'model.test_cfg.rpn.max_per_img=100', 'model.test_cfg.rcnn.max_per_img=20',
        ]
    if task == 'mmseg':
        return options + [
            'train_cfg.max_iters=2', 'train_cfg.val_interval=100',
            'default_hooks.checkpoint.interval=2',
            'train_dataloader.dataset.pipeline.2.scale=(256,128)',
            'train_dataloader.dataset.pipeline.3.crop_size=(128,128)',
            'model.data_preprocessor.size=(128,128)',
            'test_dataloader.dataset.pipeline.1.scale=(256,128)',
        ]
    return options + [
        'train_dataloader.batch_size=4', 'val_dataloader.batch_size=4',
        'train_cfg.max_epochs=2', 'train_cfg.val_interval=9',
        'param_scheduler.0.end=1', 'param_scheduler.1.begin=1',  # 1 warm-up epoch of 2
        'train_dataloader.dataset.pipeline.1.scale=64',
        'test_dataloader.dataset.pipeline.1.scale=72',
        'test_dataloader.dataset.pipeline.2.crop_size=64',
        # the validation run at the end of training, too
        'val_dataloader.dataset.pipeline.1.scale=72',
        'val_dataloader.dataset.pipeline.2.crop_size=64',
    ]
