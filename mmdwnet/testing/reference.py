"""Reference implementations of mmdwnet's operators for the tests.

Written from the definitions, slow and obviously correct, and independent of
:mod:`mmdwnet.ops`: they share no code with it and never call ``F.conv2d``, which the
operators themselves call on some paths. Kernel tap ``i`` of a size-K kernel reads row
``h + i - K // 2`` (and likewise for columns), so the maps are zero padded by ``K // 2``
before and ``K - 1 - K // 2`` after: the same size out, for odd and even K alike.
"""
import torch
import torch.nn.functional as F


def neighbourhoods(x, k):
    """(B, C, K, K, H, W): the K x K neighbourhood of every position, zeros outside."""
    b, c, h, w = x.shape
    before, after = k // 2, k - 1 - k // 2
    padded = F.pad(x, (before, after, before, after))
    return F.unfold(padded, k).view(b, c, k, k, h, w)


def idwconv(x, weight):
    """Inhomogeneous dynamic depth-wise convolution: ``weight`` (B, G, K, K, H, W) holds
    one kernel per position, shared by the C / G consecutive channels of a group."""
    b, c, h, w = x.shape
    groups, k = weight.shape[1], weight.shape[2]
    cols = neighbourhoods(x, k).view(b, groups, c // groups, k, k, h, w)
    return (cols * weight.unsqueeze(2)).sum(dim=(3, 4)).view(b, c, h, w)


def predicted_idwconv(x, hidden, weight, bias, k):
    """I-D-DW with its kernels predicted by a 1x1 convolution: ``weight`` (G*K*K, R),
    ``bias`` (G*K*K) applied to ``hidden`` (B, R, H, W)."""
    b, _, h, w = x.shape
    kernels = torch.einsum('or,brhw->bohw', weight, hidden) + bias.view(1, -1, 1, 1)
    return idwconv(x, kernels.view(b, -1, k, k, h, w))


def dwconv(x, weight, bias=None):
    """Depth-wise convolution with kernels shared by the batch, (C, 1, K, K), or one set
    per sample, (B, C, K, K)."""
    b, c, h, w = x.shape
    k = weight.shape[-1]
    kernels = weight.reshape(-1, c, k, k, 1, 1)  # (1 or B, C, K, K, 1, 1)
    out = (neighbourhoods(x, k) * kernels).sum(dim=(2, 3))
    return out if bias is None else out + bias.view(1, c, 1, 1)
