"""Generate small COCO, ADE20K and ImageNet datasets in their real formats (no download)."""
import argparse

from mmdwnet.testing import DATASETS, make_datasets


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--data-root', default='data',
                        help='where data/coco, data/ade/ADEChallengeData2016 and '
                        'data/imagenet go (default: data)')
    parser.add_argument('--tasks', nargs='+', default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument('--num-train', type=int,
                        help='training images (per class for ImageNet); default: 16 / 8')
    parser.add_argument('--num-val', type=int,
                        help='validation images (per class for ImageNet); default: 4 / 2')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    make_datasets(args.data_root, args.tasks, args.num_train, args.num_val, args.seed,
                  progress=print)


if __name__ == '__main__':
    main()
