"""Build DWNet variants through the OpenMMLab task libraries' registries and describe them."""
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from mmdwnet.models.backbones.dwnet import CONV_TYPES, DWNet
from .build import TASKS, build_model
from .markdown import markdown_table

ARCHS = ('tiny', 'base')
MODEL_NAMES = {'dw': 'DW', 'ddw': 'D-DW', 'iddw': 'I-D-DW'}


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
    return '\n'.join(markdown_table(
        ['registry', 'model', 'params', shapes_title],
        ([r['scope'], r['model'], f"{r['params']:,}",
          ' '.join('x'.join(map(str, s)) for s in r['shapes'])] for r in rows),
        ['left', 'left', 'right', 'left']))
