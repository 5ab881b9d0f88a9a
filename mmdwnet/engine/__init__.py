from .checkpoint import CheckpointError, register_checkpoint_types
from .launch import (LaunchError, adapt_to_device, add_launch_args, check_checkpoint_matches,
                     check_data, default_work_dir, enable_visualization, load_config,
                     prepare_config)

__all__ = [
    'CheckpointError', 'register_checkpoint_types', 'LaunchError', 'add_launch_args',
    'prepare_config', 'load_config', 'check_data', 'adapt_to_device', 'enable_visualization',
    'default_work_dir', 'check_checkpoint_matches'
]
