"""Resize the depth-wise kernels of a DWNet checkpoint (static, D-DW and I-D-DW, any task)
to another kernel size by bicubic interpolation, e.g. 7x7 -> 12x12 before fine-tuning at
384x384 with configs/mmpretrain/ablations/dwconv_t_k12_384px_ft.py (paper Table 14).

Example:
    python tools/model_converters/resize_kernels.py checkpoints/dwconv_t_in1k.pth \\
        checkpoints/dwconv_t_in1k_k12.pth --kernel-size 12
"""
import argparse
import sys

import torch

import mmdwnet  # noqa: F401  (safe checkpoint types)
from mmdwnet.converters.resize_kernels import resize_kernels


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='mmdwnet checkpoint (weights under `state_dict`)')
    parser.add_argument('dst', help='where to save the resized checkpoint')
    parser.add_argument('--kernel-size', type=int, required=True, help='new kernel size')
    parser.add_argument('--from-size', type=int, default=7, help='current kernel size (7)')
    args = parser.parse_args()
    if args.kernel_size < 1 or args.from_size < 1:
        sys.exit(f'error: kernel sizes must be positive, got --kernel-size '
                 f'{args.kernel_size} --from-size {args.from_size}')
    try:
        checkpoint = torch.load(args.src, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001  (any reason: one message naming the file)
        sys.exit(f'error: cannot read {args.src} as a checkpoint ({type(e).__name__})')
    state = checkpoint.get('state_dict') if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        sys.exit(f'error: {args.src} has no `state_dict` (convert released weights with '
                 'tools/model_converters/official_to_mmdwnet.py first)')
    resized, changed = resize_kernels(state, args.from_size, args.kernel_size)
    if not changed:
        sys.exit(f'error: no {args.from_size}x{args.from_size} depth-wise kernels in '
                 f'{args.src}; is --from-size right?')
    meta = dict(checkpoint.get('meta') or {}, kernel_size=args.kernel_size,
                resized_from=args.from_size)
    torch.save({'state_dict': resized, 'meta': meta}, args.dst)
    print(f'resized {len(changed)} kernel tensors {args.from_size}x{args.from_size} -> '
          f'{args.kernel_size}x{args.kernel_size}: {args.dst}')


if __name__ == '__main__':
    main()
