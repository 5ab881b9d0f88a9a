import torch
from torch import Tensor


def like_input_layout(out: Tensor, input: Tensor) -> Tensor:
    """``out`` in the memory format of the 4-D ``input``: channels-last stays channels-last,
    as torch's own convolutions keep it.

    DWNet runs channels-last; an operator that hands back a (B, C, H, W)-contiguous map
    makes the layers after it run in that layout, and their backward passes then meet
    channels-last gradients: PyTorch's BatchNorm backward for mixed layouts is several
    times slower than one copy of the map.
    """
    if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out


def empty_like_layout(input: Tensor) -> Tensor:
    """An uninitialised tensor like ``input`` in the memory format
    :func:`like_input_layout` gives (channels-last where ``input`` is, else NCHW), allocated
    in that format directly."""
    channels_last = (input.is_contiguous(memory_format=torch.channels_last)
                     and not input.is_contiguous())
    return torch.empty_like(input, memory_format=torch.channels_last if channels_last
                            else torch.contiguous_format)
