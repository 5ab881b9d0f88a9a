from .synthetic import make_ade20k, make_coco, make_datasets, make_imagenet, natural_images

__all__ = ['make_coco', 'make_ade20k', 'make_imagenet', 'make_datasets', 'natural_images']
