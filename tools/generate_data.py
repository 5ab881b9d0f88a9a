"""Generate small COCO, ADE20K and ImageNet datasets in their real formats (no download)."""
import argparse

from mmdwnet.datasets import make_datasets


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--data-root', default='data',
                        help='where data/coco, data/ade/ADEChallengeData2016 and '
                        'data/imagenet go (default: data)')
    parser.add_argument('--tasks', nargs='+', default=['coco', 'ade20k', 'imagenet'],
                        choices=['coco', 'ade20k', 'imagenet'])
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    make_datasets(args.data_root, args.tasks, args.seed, progress=print)


if __name__ == '__main__':
    main()
