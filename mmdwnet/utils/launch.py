"""What ``tools/train.py`` and ``tools/test.py`` do before handing a config to mmengine's
Runner: load it, check the task and the data, and adapt it to the machine."""
import argparse
import logging
import os
import os.path as osp
from typing import Dict, Iterable, Optional

import torch
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log

from .build import config_task
from .state_dict import state_dict_differences

DATA_HINT = ('generate a small one with `python tools/generate_data.py`, or point the config '
             'elsewhere with --cfg-options {key}.dataset.data_root=PATH')


class LaunchError(RuntimeError):
    """A problem with the config, the data or a checkpoint that the user has to fix."""


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    """The options tools/train.py and tools/test.py share."""
    parser.add_argument('--work-dir', help='the dir to save logs, checkpoints and metrics')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value pairs')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def prepare_config(args: argparse.Namespace) -> Config:
    """Load ``args.config`` with the shared options of :func:`add_launch_args` applied."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = default_work_dir(cfg, args.config, args.work_dir)
    return cfg


def load_config(path: str, cfg_options: Optional[Dict] = None) -> Config:
    """Load a config, merge command-line overrides and check its task (``default_scope``)."""
    if not osp.isfile(path):
        raise LaunchError(f'config file {path!r} does not exist (looked for '
                          f'{osp.abspath(path)}); configs of this project are under '
                          'configs/mmdet, configs/mmseg and configs/mmpretrain')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    try:
        config_task(cfg)
    except ValueError as e:
        raise LaunchError(f'config {path!r}: {e}') from None
    return cfg


def _datasets(dataset: Dict):
    """The leaf datasets of a dataset config (through wrappers such as RepeatDataset)."""
    if 'datasets' in dataset:
        for d in dataset['datasets']:
            yield from _datasets(d)
    elif 'dataset' in dataset:
        yield from _datasets(dataset['dataset'])
    else:
        yield dataset


def check_data(cfg: Config, keys: Iterable[str]) -> None:
    """Fail early, with the paths involved, when a dataloader's data is not on disk."""
    for key in keys:
        loader = cfg.get(key)
        if not loader:
            continue
        for dataset in _datasets(loader['dataset']):
            root = dataset.get('data_root', '') or ''
            if root and not osp.isdir(root):
                raise LaunchError(
                    f'{key}: dataset directory {root!r} not found (looked in '
                    f'{osp.abspath(root)}). Put the dataset there, '
                    + DATA_HINT.format(key=key))
            ann_file = dataset.get('ann_file', '') or ''
            if ann_file:
                path = ann_file if osp.isabs(ann_file) else osp.join(root, ann_file)
                if not osp.isfile(path):
                    raise LaunchError(
                        f'{key}: annotation file {ann_file!r} not found (looked for '
                        f'{osp.abspath(path)}). Check the dataset layout, '
                        + DATA_HINT.format(key=key))


def _replace_sync_bn(node) -> int:
    count = 0
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _replace_sync_bn(value)
    return count


def adapt_to_device(cfg: Config, launcher: str = 'none') -> None:
    """Make a GPU recipe run on a machine without CUDA: plain instead of AMP optimizer
    wrapper, BN instead of SyncBN, and for distributed launches the gloo backend with a CPU
    DistributedDataParallel (mmengine initialises NCCL on a CUDA device otherwise)."""
    if torch.cuda.is_available():
        return
    if cfg.get('optim_wrapper', {}).get('type') == 'AmpOptimWrapper':
        cfg.optim_wrapper.type = 'OptimWrapper'
        cfg.optim_wrapper.pop('loss_scale', None)
        print_log('No CUDA device: mixed precision (AmpOptimWrapper) is off, training in '
                  'float32.', logger='current')
    if launcher != 'none':
        replaced = _replace_sync_bn(cfg.model)
        if replaced:
            print_log(f'No CUDA device: {replaced} SyncBN layers of the config use BN.',
                      logger='current')
        cfg.env_cfg = ConfigDict(cfg.get('env_cfg', {}))
        cfg.env_cfg.dist_cfg = dict(backend='gloo')
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
        if launcher == 'pytorch' and not torch.distributed.is_initialized():
            # mmengine's init_dist calls torch.cuda.set_device first, which fails here
            torch.distributed.init_process_group(backend='gloo')


def take_compile_option(cfg: Config) -> Optional[Dict]:
    """Remove mmengine's ``compile`` option (``True`` or a dict of ``torch.compile``
    arguments) from ``cfg`` and return it as a dict, or None when it is unset or False.

    mmengine compiles the whole ``train_step``: data preprocessing, batch augmentations,
    loss and optimizer step. With torch 2.13, dynamo stops at the optimizer step
    (mmengine's parameter groups: ``'UserDefinedDictVariable' object has no attribute
    'items'``) and inductor at mmpretrain's Mixup/CutMix (its ``randperm`` pattern:
    ``Not all inputs to pattern found in match.kwargs``). :func:`compile_backbone`
    compiles the backbone instead: all of DWNet's operators, and state-dict keys
    unchanged."""
    option = cfg.pop('compile', None)
    if option is None or option is False:
        return None
    if option is True:
        return {}
    if not isinstance(option, dict):
        raise LaunchError(f'compile must be True, False or a dict of torch.compile '
                          f'arguments, got {option!r}')
    return dict(option)


def compile_backbone(model: torch.nn.Module, options: Dict) -> None:
    """``torch.compile`` the backbone of ``model`` (unwrapped from DDP if need be) in place,
    with ``options`` (see :func:`take_compile_option`)."""
    from mmengine.model import is_model_wrapper
    model = model.module if is_model_wrapper(model) else model
    backbone = getattr(model, 'backbone', None)
    if backbone is None:
        raise LaunchError(f'compile: {type(model).__name__} has no backbone to compile')
    backbone.compile(**options)  # in place: no '_orig_mod.' in checkpoints
    print_log(f'compiled the backbone ({type(backbone).__name__}) with torch.compile('
              f'{", ".join(f"{k}={v!r}" for k, v in options.items())}); the first '
              'iterations are slow while it compiles', logger='current')


def resume_checkpoint(work_dir: str, path: Optional[str] = None) -> Optional[str]:
    """The checkpoint a ``--resume`` run starts from.

    Without ``path`` (``--resume`` alone): the one the work dir's ``last_checkpoint``
    names, or, if that one is truncated or damaged (a job killed while saving), the newest
    intact checkpoint in the work dir, with a warning naming both; None where there is no
    ``last_checkpoint`` (training starts afresh, as mmengine does). With ``path``: that
    file, and a :class:`LaunchError` naming the newest intact checkpoint beside it if it
    cannot be read.
    """
    from mmengine.runner import find_latest_checkpoint

    from .checkpoint import is_readable_checkpoint, newest_readable_checkpoint
    if path is not None:
        if osp.isfile(path) and not is_readable_checkpoint(path):
            folder = osp.dirname(osp.abspath(path))
            intact = newest_readable_checkpoint(folder, exclude=[path])
            raise LaunchError(
                f'checkpoint {path} is corrupt or truncated and cannot be read; ' +
                (f'the newest intact checkpoint beside it is {intact}: resume with '
                 f'--resume {intact}' if intact else f'{folder} holds no intact checkpoint'))
        return path
    latest = find_latest_checkpoint(work_dir) if osp.isdir(work_dir) else None
    if latest is None or is_readable_checkpoint(latest):
        return latest
    intact = newest_readable_checkpoint(work_dir, exclude=[latest])
    if intact is None:
        raise LaunchError(f'the newest checkpoint {latest} (named by {work_dir}/last_checkpoint'
                          f') is corrupt or truncated, and {work_dir} holds no intact '
                          'checkpoint to resume from')
    print_log(f'the newest checkpoint {latest} is corrupt or truncated (a run killed while '
              f'saving?); resuming from the newest intact one, {intact}', logger='current',
              level=logging.WARNING)
    return intact


def enable_visualization(cfg: Config, show_dir: str) -> None:
    """Save the visualised test predictions under ``show_dir`` with each task's own hook; a
    relative ``show_dir`` is inside the work dir (mmdet adds its timestamped folder)."""
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise LaunchError('--show-dir needs a `visualization` entry in default_hooks, '
                          'which this config does not have')
    if cfg.default_scope == 'mmdet':
        hook.update(draw=True, test_out_dir=show_dir)
        return
    out_dir = show_dir if osp.isabs(show_dir) else osp.join(cfg.work_dir, show_dir)
    if cfg.default_scope == 'mmseg':
        hook.update(draw=True, interval=1)
        cfg.visualizer.save_dir = out_dir
    else:
        hook.update(enable=True, out_dir=out_dir)


def default_work_dir(cfg: Config, config_path: str, work_dir: Optional[str]) -> str:
    """``--work-dir``, else the config's ``work_dir``, else ``work_dirs/<config name>``."""
    if work_dir:
        return work_dir
    return cfg.get('work_dir') or osp.join('work_dirs',
                                           osp.splitext(osp.basename(config_path))[0])


def check_checkpoint_matches(model: torch.nn.Module, filename: str) -> None:
    """Refuse a checkpoint whose weights do not fit the model (another architecture)."""
    from mmengine.runner.checkpoint import _load_checkpoint
    if not osp.isfile(filename):
        raise LaunchError(f'checkpoint {filename!r} does not exist (looked for '
                          f'{osp.abspath(filename)})')
    checkpoint = _load_checkpoint(filename, map_location='cpu')
    state = checkpoint.get('state_dict', checkpoint)
    missing, unexpected, mismatched = state_dict_differences(state, model)
    if missing or unexpected or mismatched:
        examples = [f'{k}: checkpoint {tuple(state[k].shape)}' for k in mismatched[:3]] + \
            missing[:2] + unexpected[:2]
        raise LaunchError(
            f'checkpoint {filename!r} does not fit the model of this config: '
            f'{len(missing)} missing, {len(unexpected)} unexpected and {len(mismatched)} '
            f'differently shaped tensors (e.g. {"; ".join(examples)}). It was probably '
            'trained with another architecture; use the config it was trained with.')
