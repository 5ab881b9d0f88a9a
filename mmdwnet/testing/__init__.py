"""For tests, demos and smoke runs (as in mmyolo's ``mmyolo.testing``): generated datasets
in the COCO, ADE20K and ImageNet layouts, and the ``--cfg-options`` of short CPU runs; the
operators' unfold references in :mod:`mmdwnet.testing.reference` (not imported here)."""
from .smoke import smoke_run_options
from .synthetic import (DATASETS, dataset_dir, make_ade20k, make_coco, make_datasets,
                        make_imagenet, natural_images)

__all__ = [
    'DATASETS', 'dataset_dir', 'make_coco', 'make_ade20k', 'make_imagenet', 'make_datasets',
    'natural_images', 'smoke_run_options'
]
