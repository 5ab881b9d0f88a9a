"""Train with a detection, segmentation or classification config (task from default_scope)."""
import argparse
import sys

from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from mmdwnet.utils.checkpoint import CheckpointError
from mmdwnet.utils.launch import (LaunchError, adapt_to_device, add_launch_args, check_data,
                                  compile_backbone, prepare_config, resume_checkpoint,
                                  take_compile_option)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--amp', action='store_true',
                        help='enable automatic-mixed-precision training (CUDA only)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate with the actual total batch size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint, or without a path from the latest '
                        'checkpoint in the work dir')
    add_launch_args(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    try:
        cfg = prepare_config(args)
        if args.amp:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
        if args.auto_scale_lr:
            cfg.auto_scale_lr.enable = True
        if args.resume is not None:
            # --resume alone: last_checkpoint, or the newest intact checkpoint if that one
            # was cut short; a given path must be readable
            cfg.resume = True
            cfg.load_from = resume_checkpoint(
                cfg.work_dir, None if args.resume == 'auto' else args.resume)
        check_data(cfg, ['train_dataloader', 'val_dataloader'])
        adapt_to_device(cfg, args.launcher)
        compile_options = take_compile_option(cfg)  # the backbone, not all of train_step
        runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
        if compile_options is not None:
            compile_backbone(runner.model, compile_options)
        runner.train()
    except (LaunchError, CheckpointError) as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()
