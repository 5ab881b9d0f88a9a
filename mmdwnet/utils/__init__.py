from .build import TASKS, build_model, config_task, imagenet_classifier_cfg

__all__ = ['TASKS', 'build_model', 'config_task', 'imagenet_classifier_cfg']
