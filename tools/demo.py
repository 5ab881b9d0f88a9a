"""Run a trained or converted model on one image with the task library's inferencer.

Detection draws boxes and masks, segmentation a colour overlay (both saved as PNG);
classification prints the top-5 classes.
"""
import argparse
import json
import sys

from mmdwnet.apis import prediction_to_json, run_inference
from mmdwnet.utils.launch import LaunchError, load_config


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('image', help='image file')
    parser.add_argument('config', help='config of the model')
    parser.add_argument('checkpoint', help='checkpoint (trained or converted)')
    parser.add_argument('--out', default='prediction.png', help='where the picture goes')
    parser.add_argument('--device', default='cpu', help='e.g. cpu or cuda:0')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: draw boxes scoring at least this')
    parser.add_argument('--pred-out', help='also write the raw prediction to this JSON file: '
                        'classification scores, detection boxes/scores/labels, or the '
                        'segmentation label map')
    args = parser.parse_args()
    try:
        cfg = load_config(args.config)
        result = run_inference(cfg, args.checkpoint, args.image, args.out, args.device,
                               args.score_thr)
    except (LaunchError, FileNotFoundError) as e:
        sys.exit(f'error: {e}')
    for line in result['lines']:
        print(line)
    if args.pred_out:
        with open(args.pred_out, 'w') as f:
            json.dump(prediction_to_json(result['prediction']), f)
        print(f'saved {args.pred_out}')


if __name__ == '__main__':
    main()
