"""Export a model out of PyTorch: ONNX in standard operations only (ONNX Runtime runs it,
no plugin), or a torch.export program (torch.export.save; load it after `import mmdwnet`).

    python tools/deployment/export.py CONFIG CHECKPOINT --format onnx --out model.onnx \
        [--shape H W] [--dynamic] [--verify] [--opset 17]
    python tools/deployment/export.py CONFIG CHECKPOINT --format exported-program \
        --out model.pt2 [--shape H W] [--dynamic] [--verify]

Classification exports the logits, segmentation the per-pixel logits at the input size,
detection the backbone and neck's feature maps. The input is the preprocessed image batch.
"""
import argparse
import sys

from mmdwnet.apis.export import FORMATS, ExportError, export_model
from mmdwnet.utils.launch import LaunchError, load_config


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config of the model')
    parser.add_argument('checkpoint', help='its trained (or converted) weights')
    parser.add_argument('--format', required=True, help=f'one of {", ".join(FORMATS)}')
    parser.add_argument('--out', required=True, help='the file to write')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help="example input size (default: the task's test size)")
    parser.add_argument('--dynamic', action='store_true',
                        help='batch, height and width as dynamic axes')
    parser.add_argument('--verify', action='store_true',
                        help='run the exported model and compare it with PyTorch')
    parser.add_argument('--opset', type=int, default=17, help='ONNX opset (default: 17; onnx only)')
    args = parser.parse_args()
    try:
        cfg = load_config(args.config)
        export_model(cfg, args.checkpoint, args.format, args.out, args.shape, args.dynamic,
                     args.verify, args.opset)
    except (ExportError, LaunchError) as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
