"""Up-sample (or down-sample) the depth-wise kernels of a DWNet checkpoint, for fine-tuning
with another kernel size (the paper's 7x7 -> 12x12 at 384x384, Table 14).

Kernels are resized with bicubic interpolation (``align_corners=False``), as Swin Transformer
resizes its relative-position bias tables; values are not rescaled. What is resized:

* static kernels ``*.dw_conv.weight`` / ``*.local_conv.weight``: (C, 1, K, K);
* the kernel predictors of the dynamic operators, ``*.dw_conv.conv2.{weight,bias}``: their
  N*K*K output channels are N maps of K x K taps (N = C for D-DW, G for I-D-DW), so each
  input channel's weights are resized as N images of K x K.
"""
import re
from typing import Dict, List, Tuple

import torch.nn.functional as F
from torch import Tensor

STATIC = re.compile(r'(^|\.)(dw_conv|local_conv)\.weight$')
PREDICTOR = re.compile(r'(^|\.)dw_conv\.conv2\.(weight|bias)$')


def _resize(maps: Tensor, size: int) -> Tensor:
    """(..., K, K) -> (..., size, size), bicubic."""
    lead = maps.shape[:-2]
    out = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]).float(), size=(size, size),
                        mode='bicubic', align_corners=False)
    return out.reshape(*lead, size, size).to(maps.dtype)


def resize_kernels(state: Dict[str, Tensor], old_size: int,
                   new_size: int) -> Tuple[Dict[str, Tensor], List[str]]:
    """Return the state dict with every depth-wise kernel resized and the keys changed."""
    out, changed = dict(state), []
    k2 = old_size * old_size
    for key, value in state.items():
        if STATIC.search(key) and value.dim() == 4 and value.shape[1] == 1 \
                and tuple(value.shape[2:]) == (old_size, old_size):
            out[key] = _resize(value, new_size)
        elif PREDICTOR.search(key) and value.shape[0] % k2 == 0:
            n = value.shape[0] // k2
            if value.dim() == 4:  # (N*K*K, R, 1, 1) -> (N, R, K, K) -> resize -> back
                r = value.shape[1]
                maps = value.reshape(n, old_size, old_size, r).permute(0, 3, 1, 2)
                maps = _resize(maps, new_size).permute(0, 2, 3, 1)
                out[key] = maps.reshape(n * new_size * new_size, r, 1, 1)
            else:  # bias (N*K*K, )
                out[key] = _resize(value.reshape(n, old_size, old_size),
                                   new_size).reshape(-1)
        else:
            continue
        changed.append(key)
    return out, changed
