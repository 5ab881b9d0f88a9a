"""Convert a checkpoint released with the paper's code to mmdwnet.

ImageNet classifiers, Cascade Mask R-CNN and UPerNet checkpoints are recognised from their
keys; the result loads into the model of the matching config with no missing or unexpected
keys (it is checked before anything is written).
"""
import argparse
import os.path as osp
import sys

import torch
from mmengine.hub import get_config

from mmdwnet.converters import ConversionError, check_fits, convert_official, target_config
from mmdwnet.utils import build_model


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('src', help='checkpoint of the reference implementation')
    parser.add_argument('dst', help='where to save the mmdwnet checkpoint')
    args = parser.parse_args()
    try:
        checkpoint = torch.load(args.src, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001  (any reason: one message naming the file)
        sys.exit(f'error: cannot read {args.src} as a checkpoint ({type(e).__name__}: '
                 f'{str(e).splitlines()[0] if str(e) else ""})')
    try:
        state, info = convert_official(checkpoint)
        config = target_config(**info)
        check_fits(state, build_model(get_config(f'mmdwnet::{config}')))
    except ConversionError as e:
        sys.exit(f'error: {args.src} is not a checkpoint this converter knows: {e}')
    torch.save({'state_dict': state, 'meta': dict(converted_from=osp.basename(args.src),
                                                  config=config, **info)}, args.dst)
    print(f"converted {info['kind']} checkpoint, {info['arch']} {info['conv_type']}: "
          f'{len(state)} tensors -> {args.dst} (config: configs/{config})')


if __name__ == '__main__':
    main()
