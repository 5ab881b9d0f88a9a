"""Test a checkpoint with a detection, segmentation or classification config."""
import argparse
import json
import os
import sys

from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from mmdwnet.utils.checkpoint import CheckpointError
from mmdwnet.utils.launch import (LaunchError, adapt_to_device, add_launch_args,
                                  check_checkpoint_matches, check_data, enable_visualization,
                                  prepare_config)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--show-dir', help='save visualised predictions to this dir '
                        '(relative to the work dir\'s timestamped folder for mmdet)')
    add_launch_args(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    try:
        cfg = prepare_config(args)
        if not os.path.isfile(args.checkpoint):
            raise LaunchError(f'checkpoint {args.checkpoint!r} does not exist (looked for '
                              f'{os.path.abspath(args.checkpoint)})')
        cfg.load_from = args.checkpoint
        check_data(cfg, ['test_dataloader'])
        if args.show_dir:
            enable_visualization(cfg, args.show_dir)
        adapt_to_device(cfg, args.launcher)
        runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
        check_checkpoint_matches(runner.model, args.checkpoint)
        metrics = runner.test()
    except (LaunchError, CheckpointError) as e:
        sys.exit(f'error: {e}')
    print('metrics: ' + json.dumps({k: float(v) for k, v in metrics.items()}))


if __name__ == '__main__':
    main()
