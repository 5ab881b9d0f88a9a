"""Test a checkpoint with a detection, segmentation or classification config."""
import argparse
import json
import os
import sys

from mmengine.config import DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from mmdwnet.engine import (CheckpointError, LaunchError, adapt_to_device, check_data,
                            default_work_dir, enable_visualization, load_config)
from mmdwnet.engine.launch import check_checkpoint_matches


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save logs and metrics')
    parser.add_argument('--show-dir', help='save visualised predictions to this dir '
                        '(relative to the work dir\'s timestamped folder for mmdet)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value pairs')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main():
    args = parse_args()
    try:
        cfg = load_config(args.config, args.cfg_options)
        cfg.launcher = args.launcher
        cfg.work_dir = default_work_dir(cfg, args.config, args.work_dir)
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
