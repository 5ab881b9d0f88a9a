from .build import TASKS, build_model, config_task
from .summary import (format_table, imagenet_classifier_cfg, summarize_backbones,
                      summarize_classifiers)

__all__ = [
    'TASKS', 'build_model', 'config_task', 'summarize_backbones', 'summarize_classifiers',
    'imagenet_classifier_cfg', 'format_table'
]
