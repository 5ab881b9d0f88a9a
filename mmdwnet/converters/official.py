"""Convert checkpoints of the authors' DWNet code (github.com/Atten4Vis/DemystifyLocalViT)
to mmdwnet: ImageNet classifiers (weights under ``model``), Cascade Mask R-CNN (mmdet 2.x)
and UPerNet (mmseg 0.x) checkpoints (weights under ``state_dict``)."""
import re
from collections import OrderedDict
from typing import Dict, Tuple

import torch
from torch import Tensor

from mmdwnet.utils.state_dict import state_dict_differences

BLOCK_RULES = [
    # (reference name inside a block, mmdwnet name inside a block)
    (r'attn2conv\.conv0\.', 'pw_conv1.'),
    (r'attn2conv\.bn0\.', 'norm1.'),
    (r'attn2conv\.conv\.conv1\.0\.', 'dw_conv.conv1.'),  # iddw kernel predictor
    (r'attn2conv\.conv\.conv1\.1\.', 'dw_conv.norm.'),
    (r'attn2conv\.conv\.conv2\.0\.', 'dw_conv.conv2.'),
    (r'attn2conv\.conv\.conv1\.', 'dw_conv.conv1.'),  # ddw kernel predictor
    (r'attn2conv\.conv\.bn\.', 'dw_conv.norm.'),
    (r'attn2conv\.conv\.conv2\.', 'dw_conv.conv2.'),
    (r'attn2conv\.conv\.', 'dw_conv.'),  # dw weight/bias, ddw bias
    (r'attn2conv\.bn\.', 'norm2.'),
    (r'attn2conv\.conv2\.', 'pw_conv2.'),
    (r'attn2conv\.bn2\.', 'norm3.'),
    (r'bn\.', 'ffn_norm.'),
    (r'mlp\.fc1\.', 'ffn.layers.0.0.'),
    (r'mlp\.fc2\.', 'ffn.layers.1.'),
]


class ConversionError(ValueError):
    """The file is not one of the checkpoints this converter knows."""


def merging_to_unfold_order(weight: Tensor, channels: int) -> Tensor:
    """Reorder the last (4C) dim of patch-merging weights: the reference concatenates the 2x2
    positions (0,0), (1,0), (0,1), (1,1) (row, col) as blocks of C channels; mmcv's
    PatchMerging (nn.Unfold) puts channel c of position (r, s) at 4c + 2r + s."""
    blocks = weight.reshape(*weight.shape[:-1], 4, channels)  # [..., k, c]
    # k = 2 * s + r  ->  (s, r) -> (r, s), then c-major
    blocks = blocks.reshape(*weight.shape[:-1], 2, 2, channels).transpose(-3, -2)
    return blocks.movedim(-1, -3).reshape(weight.shape)


def _rename_backbone_key(key: str) -> str:
    if key.startswith('patch_embed.proj.'):
        return 'patch_embed.projection.' + key[len('patch_embed.proj.'):]
    if key.startswith('patch_embed.norm.'):
        return key
    m = re.match(r'layers\.(\d+)\.blocks\.(\d+)\.(.*)$', key)
    if m:
        stage, block, rest = m.groups()
        for pattern, target in BLOCK_RULES:
            if re.match(pattern, rest):
                return f'stages.{stage}.blocks.{block}.' + re.sub(pattern, target, rest, 1)
        raise ConversionError(f'unknown block parameter {key!r}')
    m = re.match(r'layers\.(\d+)\.downsample\.(norm|reduction)\.(.*)$', key)
    if m:
        stage, part, rest = m.groups()
        return f'stages.{int(stage) + 1}.downsample.{part}.{rest}'
    m = re.match(r'norm(\d?)\.(.*)$', key)
    if m:
        return f'norm{m.group(1) or 3}.{m.group(2)}'
    raise ConversionError(f'unknown backbone parameter {key!r}')


def convert_backbone(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Reference backbone parameters (no prefix) to DWNet names and layouts."""
    out = OrderedDict()
    for key, value in state.items():
        new_key = _rename_backbone_key(key)
        if re.match(r'stages\.\d+\.downsample\.(norm\.(weight|bias)|reduction\.weight)$',
                    new_key):
            value = merging_to_unfold_order(value, value.shape[-1] // 4)
        out[new_key] = value
    return out


def detect(checkpoint: Dict) -> Tuple[str, str, str, Dict[str, Tensor]]:
    """Return ``(kind, arch, conv_type, weights)`` of a reference checkpoint; ``kind`` is
    ``'cls'``, ``'det'`` or ``'seg'``."""
    if not isinstance(checkpoint, dict):
        raise ConversionError(f'expected a dict checkpoint, got {type(checkpoint).__name__}')
    if 'model' in checkpoint and isinstance(checkpoint['model'], dict):
        weights, prefix, kind = checkpoint['model'], '', 'cls'
    elif 'state_dict' in checkpoint and isinstance(checkpoint['state_dict'], dict):
        weights, prefix = checkpoint['state_dict'], 'backbone.'
        if any(k.startswith('roi_head.') for k in weights):
            kind = 'det'
        elif any(k.startswith('decode_head.') for k in weights):
            kind = 'seg'
        else:
            raise ConversionError('a `state_dict` checkpoint without roi_head (Cascade Mask '
                                  'R-CNN) or decode_head (UPerNet) parameters')
    else:
        raise ConversionError('neither `model` (ImageNet classifier) nor `state_dict` '
                              f'(detection/segmentation) in the checkpoint; keys: '
                              f'{sorted(checkpoint)[:8]}')
    stem = weights.get(prefix + 'patch_embed.proj.weight')
    if not isinstance(stem, Tensor) or stem.dim() != 4 or tuple(stem.shape[1:]) != (3, 4, 4):
        raise ConversionError(f'no DWNet stem {prefix}patch_embed.proj.weight of shape '
                              f'(C, 3, 4, 4); found {None if stem is None else tuple(stem.shape)}')
    arch = {96: 'tiny', 128: 'base'}.get(stem.shape[0])
    if arch is None:
        raise ConversionError(f'stem width {stem.shape[0]} is neither 96 (tiny) nor 128 (base)')
    block = prefix + 'layers.0.blocks.0.attn2conv.conv.'
    if block + 'conv1.0.weight' in weights:
        conv_type = 'iddw'
    elif block + 'conv1.weight' in weights:
        conv_type = 'ddw'
    elif block + 'weight' in weights:
        conv_type = 'dw'
    else:
        raise ConversionError(f'no depth-wise operator under {block}')
    return kind, arch, conv_type, weights


def convert_official(checkpoint: Dict) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """Convert a reference checkpoint; returns the mmdwnet state dict and a description
    ``dict(kind, arch, conv_type)``."""
    kind, arch, conv_type, weights = detect(checkpoint)
    out = OrderedDict()
    if kind == 'cls':
        backbone = {k: v for k, v in weights.items() if not k.startswith('head.')}
        out.update({f'backbone.{k}': v for k, v in convert_backbone(backbone).items()})
        for name in ('weight', 'bias'):
            out[f'head.fc.{name}'] = weights[f'head.{name}']
    else:
        backbone = {k[len('backbone.'):]: v for k, v in weights.items()
                    if k.startswith('backbone.')}
        out.update({f'backbone.{k}': v for k, v in convert_backbone(backbone).items()})
        out.update({k: v for k, v in weights.items() if not k.startswith('backbone.')})
    return out, dict(kind=kind, arch=arch, conv_type=conv_type)


def target_config(kind: str, arch: str, conv_type: str) -> str:
    """The mmdwnet config (relative to configs/) whose model the converted weights fit."""
    size = arch[0]
    return {
        'cls': f'mmpretrain/{conv_type}conv_{size}_8xb128_in1k.py',
        'det': f'mmdet/cascade_{conv_type}conv_{size}_3x.py',
        'seg': f'mmseg/upernet_{conv_type}conv_{size}_512x512_160k_ade20k.py',
    }[kind]


def check_fits(state: Dict[str, Tensor], model: torch.nn.Module) -> None:
    """Raise :class:`ConversionError` unless ``state`` loads into ``model`` with no missing,
    unexpected or differently shaped tensors."""
    missing, unexpected, mismatched = state_dict_differences(state, model)
    if missing or unexpected or mismatched:
        raise ConversionError(
            f'the converted weights do not fit the mmdwnet model: {len(missing)} missing '
            f'(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), '
            f'{len(mismatched)} differently shaped (e.g. {mismatched[:3]})')
