"""From a config to its model: the one place where mmdwnet's tools and tests build one."""
import importlib
from typing import Dict, Optional, Union

from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import DefaultScope
from torch import nn

from mmdwnet.models.backbones.dwnet import DWNet

#: The OpenMMLab libraries whose configs mmdwnet ships; a config's ``default_scope`` names
#: its library.
TASKS = ('mmpretrain', 'mmdet', 'mmseg')


def config_task(cfg: Union[Config, dict]) -> str:
    """The task library of a whole config: its ``default_scope``."""
    task = cfg.get('default_scope')
    if task not in TASKS:
        raise ValueError(f'config `default_scope` must be one of {TASKS} (the library that '
                         f'builds and runs it), got {task!r}')
    return task


def build_model(cfg: Union[Config, dict], task: Optional[str] = None) -> nn.Module:
    """Build a model with its task library's ``MODELS`` registry, that library being the
    default scope while it builds.

    Args:
        cfg (Config | dict): A whole config, whose ``model`` is built with the config's
            top-level ``data_preprocessor`` merged in (as mmengine's Runner does) and
            whose ``default_scope`` names the library; or a model config (a dict with a
            ``type``).
        task (str, optional): The library of a model config: one of :data:`TASKS`.
            Defaults to 'mmpretrain'. For a whole config, it must match ``default_scope``
            where given.

    Returns:
        nn.Module: The model in eval mode, with SyncBN reverted to BN (so that it runs in
        one process); its ``init_weights`` is not called, so a Pretrained ``init_cfg`` is
        not loaded.
    """
    if 'model' in cfg:
        scope = config_task(cfg)
        if task is not None and task != scope:
            raise ValueError(f'build_model: `task` {task!r} does not match the config\'s '
                             f'default_scope {scope!r}')
        model_cfg = cfg['model'].copy()
        if cfg.get('data_preprocessor') is not None:
            model_cfg.setdefault('data_preprocessor', cfg['data_preprocessor'])
    elif 'type' in cfg:
        scope, model_cfg = task or 'mmpretrain', cfg
        if scope not in TASKS:
            raise ValueError(f'build_model: `task` must be one of {TASKS}, got {task!r}')
    else:
        raise ValueError('build_model: `cfg` must be a whole config (with a `model`) or a '
                         f'model config (with a `type`), got the keys {sorted(cfg)}')
    registry = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(model_cfg)
    return revert_sync_batchnorm(model).eval()


def imagenet_classifier_cfg(arch: str, conv_type: str, num_classes: int = 1000) -> Dict:
    """MMPretrain ``ImageClassifier`` of the paper's ImageNet models: DWNet (last stage,
    LayerNorm), global average pooling and a linear head."""
    return dict(
        type='ImageClassifier',
        backbone=dict(type='DWNet', arch=arch, conv_type=conv_type, out_indices=(3, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead',
            num_classes=num_classes,
            in_channels=DWNet.arch_zoo[arch]['embed_dims'] * 8,
            loss=dict(type='CrossEntropyLoss')))
