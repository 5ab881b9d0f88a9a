"""Quickstart demo: build every DWNet variant through the MMPretrain, MMDetection and
MMSegmentation registries and print parameters and output shapes for one image."""
import argparse

from mmdwnet.utils import format_table, summarize_backbones, summarize_classifiers


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--size', type=int, nargs=2, default=(224, 224), metavar=('H', 'W'),
                        help='input image size (default: 224 224)')
    args = parser.parse_args()
    size = tuple(args.size)
    progress = lambda msg: print(msg, flush=True)  # noqa: E731
    backbones = summarize_backbones(input_size=size, progress=progress)
    classifiers = summarize_classifiers(input_size=size, progress=progress)
    print(f'\nDWNet backbones, out_indices=(0, 1, 2, 3), one {size[0]}x{size[1]} image:\n')
    print(format_table(backbones))
    print('\nImageNet-1K classifiers (DWNet + global average pooling + linear head):\n')
    print(format_table(classifiers, shapes_title='logits shape'))


if __name__ == '__main__':
    main()
