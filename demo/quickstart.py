"""Quickstart demo: build every DWNet variant through the MMPretrain, MMDetection and
MMSegmentation registries and print parameters and output shapes for a 224x224 image."""
import argparse

from mmdwnet.utils import format_table, summarize_backbones


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--size', type=int, nargs=2, default=(224, 224), metavar=('H', 'W'),
                        help='input image size (default: 224 224)')
    args = parser.parse_args()
    rows = summarize_backbones(input_size=tuple(args.size),
                               progress=lambda msg: print(msg, flush=True))
    print(f'\nDWNet backbones, out_indices=(0, 1, 2, 3), one {args.size[0]}x{args.size[1]} '
          'image:\n')
    print(format_table(rows))


if __name__ == '__main__':
    main()
