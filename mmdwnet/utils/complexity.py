"""Parameters and FLOPs of mmdwnet models with mmengine's analysis tools.

mmengine's :class:`~mmengine.analysis.FlopAnalyzer` traces the model and counts the ATen ops
it knows. Two things are added here: counting rules for the inhomogeneous dynamic
depth-wise operators (opaque custom ops to the tracer: the operator alone, and with its
kernel prediction) and the paper's input sizes, with
the dummy data samples the detection and segmentation models need for a ``mode='tensor'``
forward. Like mmengine (and the reference code), "FLOPs" are multiply-accumulates.
"""
import math
from typing import Dict, Optional, Tuple

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape
from mmengine.config import Config
from torch import nn

from .build import build_model, config_task

# (height, width) at which the paper reports FLOPs (Tables 2 and 3), by task.
PAPER_INPUT_SIZES = {
    'mmpretrain': (224, 224),
    'mmdet': (800, 1280),
    'mmseg': (512, 2048),
}


def inhomogeneous_dwconv_flop_jit(inputs, outputs) -> int:
    """Counting rule for ``mmdwnet::inhomogeneous_dwconv2d``: every output element is a
    K x K weighted sum, so ``numel(output) * K * K`` multiply-accumulates."""
    weight_shape = get_shape(inputs[1])  # (B, G, K, K, H, W)
    return math.prod(get_shape(outputs[0])) * weight_shape[2] * weight_shape[3]


def predicted_idwconv_flop_jit(inputs, outputs) -> int:
    """Counting rule for ``mmdwnet::predicted_idwconv2d(x, hidden, weight, bias, K)``: the
    1x1 convolution that predicts the kernels (``R`` multiply-accumulates per kernel value,
    as mmengine counts the ``bmm`` it is) plus the application, ``numel(output) * K * K``."""
    b, r, h, w = get_shape(inputs[1])
    rows = get_shape(inputs[2])[0]  # G * K * K
    kernel_size = inputs[4].toIValue()
    return b * rows * r * h * w + math.prod(get_shape(outputs[0])) * kernel_size**2


OP_HANDLES = {
    'mmdwnet::inhomogeneous_dwconv2d': inhomogeneous_dwconv_flop_jit,
    'mmdwnet::predicted_idwconv2d': predicted_idwconv_flop_jit,
}


def count_flops(model: nn.Module, inputs: Tuple) -> int:
    """Multiply-accumulates of ``model(*inputs)``, with mmdwnet's counting rules.

    Ops without FLOPs in mmengine's rules (additions, activations, unfold) are not counted,
    as in the reference code's counter.
    """
    analyzer = FlopAnalyzer(model, inputs).set_op_handle(**OP_HANDLES)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return int(analyzer.total())


class _DetectorDummyForward(nn.Module):
    """The FLOP-counting forward of two-stage detectors in mmdet 2.x (``forward_dummy``),
    with which Swin's and the paper's detection FLOPs were counted: backbone, neck, the RPN
    head's convolutions, 1000 proposals through every stage's box head and the first 100
    through every stage's mask head. mmdet 3.x's ``mode='tensor'`` instead runs the mask
    heads on all proposals, which about triples the count and matches no published table."""

    num_proposals = 1000
    num_mask_rois = 100

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        model = self.model
        feats = model.extract_feat(inputs)
        outs = model.rpn_head(feats)
        height, width = inputs.shape[-2:]
        generator = torch.Generator().manual_seed(0)
        xy = torch.rand(self.num_proposals, 2, generator=generator) * inputs.new_tensor(
            [width, height]) * 0.75
        wh = torch.rand(self.num_proposals, 2, generator=generator) * inputs.new_tensor(
            [width, height]) * 0.25 + 1
        rois = torch.cat([inputs.new_zeros(self.num_proposals, 1), xy, xy + wh], dim=1)
        roi_head = model.roi_head
        stages = getattr(roi_head, 'num_stages', 1)
        for stage in range(stages):
            # Cascade heads take the stage index first, single-stage RoI heads do not.
            args = (stage, feats) if hasattr(roi_head, 'num_stages') else (feats, )
            if roi_head.with_bbox:
                results = roi_head._bbox_forward(*args, rois)
                outs = outs + (results['cls_score'], results['bbox_pred'])
            if roi_head.with_mask:
                results = roi_head._mask_forward(*args, rois[:self.num_mask_rois])
                outs = outs + (results['mask_preds'], )
        return outs


class _TensorForward(nn.Module):
    """Wraps a task model so that ``forward(inputs)`` is its ``mode='tensor'`` forward with
    fixed data samples (mmengine's tracer passes tensors only)."""

    def __init__(self, model: nn.Module, data_samples: Optional[list]):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs):
        return self.model(inputs, self.data_samples, mode='tensor')


def _data_samples(task: str, height: int, width: int) -> Optional[list]:
    meta = dict(img_shape=(height, width), ori_shape=(height, width),
                pad_shape=(height, width), batch_input_shape=(height, width),
                scale_factor=(1.0, 1.0))
    if task == 'mmdet':
        from mmdet.structures import DetDataSample
        return [DetDataSample(metainfo=meta)]
    if task == 'mmseg':
        from mmseg.structures import SegDataSample
        return [SegDataSample(metainfo=meta)]
    return None


def model_complexity(cfg: Config,
                     input_size: Optional[Tuple[int, int]] = None) -> Dict:
    """Parameters and FLOPs of a config's model for one image.

    Args:
        cfg (Config): An mmdwnet (or any mmpretrain/mmdet/mmseg) config.
        input_size (tuple[int, int], optional): (height, width) of the image. Defaults to
            the paper's size for the task: 224x224, 1280x800 (W x H) for detection and
            2048x512 for segmentation. Two-stage detectors are counted as mmdet 2.x's
            ``forward_dummy`` counted them (see :class:`_DetectorDummyForward`),
            segmentors without the auxiliary head (inference).

    Returns:
        dict: ``task``, ``input_size``, ``params`` (exact count) and ``flops``
        (multiply-accumulates).
    """
    task = config_task(cfg)
    height, width = input_size or PAPER_INPUT_SIZES[task]
    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    inputs = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    if task == 'mmdet' and hasattr(model, 'roi_head'):
        wrapped = _DetectorDummyForward(model)
    else:
        wrapped = _TensorForward(model, _data_samples(task, height, width))
    with torch.no_grad():
        flops = count_flops(wrapped, (inputs, ))
    return dict(task=task, input_size=(height, width), params=params, flops=flops)
