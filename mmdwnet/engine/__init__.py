from .checkpoint import CheckpointError, register_checkpoint_types
from .launch import (LaunchError, adapt_to_device, check_data, default_work_dir,
                     enable_visualization, load_config)

__all__ = [
    'CheckpointError', 'register_checkpoint_types', 'LaunchError', 'load_config',
    'check_data', 'adapt_to_device', 'enable_visualization', 'default_work_dir'
]
