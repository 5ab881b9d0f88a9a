"""Parameters and FLOPs (multiply-accumulates) of configs at the paper's input sizes.

Counts with mmengine's FlopAnalyzer plus mmdwnet's rule for the inhomogeneous dynamic
operator (mmdwnet/utils/complexity.py). Default sizes: 224x224 classification, 1280x800
detection, 2048x512 segmentation (W x H, as the paper writes them).

Example:
    python tools/get_flops.py configs/mmpretrain/dwconv_t_8xb128_in1k.py
    python tools/get_flops.py configs/mmdet/*.py --json flops.json
"""
import argparse
import json
import sys

from mmengine.config import DictAction

from mmdwnet.utils.complexity import model_complexity
from mmdwnet.utils.launch import LaunchError, load_config


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='+', help='config file paths')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('HEIGHT', 'WIDTH'),
                        help='input height and width (default: the paper\'s size for the '
                        'config\'s task)')
    parser.add_argument('--json', help='also write the rows to this JSON file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    return parser.parse_args()


def main():
    args = parse_args()
    if args.shape and min(args.shape) < 32:
        sys.exit(f'error: --shape must be at least 32x32 (the network down-samples 32x), '
                 f'got {args.shape[0]}x{args.shape[1]}')
    rows = []
    for i, path in enumerate(args.configs, 1):
        print(f'[{i}/{len(args.configs)}] counting {path} ...', file=sys.stderr, flush=True)
        try:
            cfg = load_config(path, args.cfg_options)
        except LaunchError as e:
            sys.exit(f'error: {e}')
        row = model_complexity(cfg, tuple(args.shape) if args.shape else None)
        row['config'] = path
        rows.append(row)
        height, width = row['input_size']
        print(f'{path}: input {width}x{height} (WxH), params {row["params"] / 1e6:.2f}M '
              f'({row["params"]:,}), FLOPs {row["flops"] / 1e9:.2f}G', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
