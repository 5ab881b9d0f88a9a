"""Small datasets in the real on-disk formats of COCO, ADE20K and ImageNet, drawn here.

Images show a few filled shapes (rectangles, ellipses, triangles) in colours tied to their
class on a noisy background, so the stock dataset classes, pipelines and metrics of mmdet,
mmseg and mmpretrain run on them unchanged.
"""
import json
import math
import os
import os.path as osp
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

# COCO 2017 category ids, in the order of mmdet's CocoDataset classes
COCO_CATEGORY_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90
]
# the shapes play three real COCO classes: (category id, name, shape, colour)
COCO_SHAPES = [(62, 'tv', 'rectangle', (40, 90, 220)), (37, 'sports ball', 'ellipse',
                                                        (230, 120, 30)),
               (38, 'kite', 'triangle', (40, 180, 70))]
# ADE20K label values (1..150; 0 is "other" and ignored): wall background, three objects
ADE_BACKGROUND = 1
ADE_SHAPES = [(8, 'rectangle', (200, 60, 60)), (13, 'ellipse', (60, 60, 200)),
              (21, 'triangle', (60, 170, 60))]
IMAGENET_CLASSES = [(0, 'n01440764'), (1, 'n01443537'), (2, 'n01484850'), (3, 'n01491361')]


def _polygon(shape: str, box: Tuple[float, float, float, float]) -> List[Tuple[float, float]]:
    x0, y0, x1, y1 = box
    if shape == 'rectangle':
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == 'triangle':
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t))
            for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]


def _canvas(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    base = rng.integers(90, 170, size=3)
    noise = rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _random_boxes(rng, width, height, count, min_size=0.2, max_size=0.45):
    boxes = []
    for _ in range(count):
        w = rng.uniform(min_size, max_size) * width
        h = rng.uniform(min_size, max_size) * height
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append((float(x0), float(y0), float(x0 + w), float(y0 + h)))
    return boxes


def make_coco(root: str, num_train: int = 16, num_val: int = 4, size=(320, 240),
              seed: int = 0, progress: Optional[Callable[[str], None]] = None) -> Dict:
    """COCO 2017 instance segmentation layout: ``train2017/``, ``val2017/`` and
    ``annotations/instances_{train,val}2017.json`` with boxes and polygon masks."""
    from mmdet.datasets import CocoDataset
    rng = np.random.default_rng(seed)
    categories = [dict(id=i, name=n, supercategory='object')
                  for i, n in zip(COCO_CATEGORY_IDS, CocoDataset.METAINFO['classes'])]
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    counts = {}
    for split, num in (('train2017', num_train), ('val2017', num_val)):
        os.makedirs(osp.join(root, split), exist_ok=True)
        images, annotations = [], []
        for idx in range(num):
            image = _canvas(rng, *size)
            draw = ImageDraw.Draw(image)
            file_name = f'{idx + 1:012d}.jpg'
            for box in _random_boxes(rng, *size, int(rng.integers(1, 4))):
                cat_id, _, shape, colour = COCO_SHAPES[int(rng.integers(len(COCO_SHAPES)))]
                poly = _polygon(shape, box)
                draw.polygon(poly, fill=colour)
                annotations.append(
                    dict(id=len(annotations) + 1, image_id=idx + 1, category_id=cat_id,
                         bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]],
                         area=_polygon_area(poly), iscrowd=0,
                         segmentation=[[round(c, 2) for p in poly for c in p]]))
            image.save(osp.join(root, split, file_name), quality=95)
            images.append(dict(id=idx + 1, file_name=file_name, width=size[0], height=size[1]))
        with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)
        counts[split] = len(images)
        if progress:
            progress(f'COCO {split}: {len(images)} images, {len(annotations)} instances')
    return counts


def _polygon_area(poly) -> float:
    xs, ys = np.array(poly).T
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def make_ade20k(root: str, num_train: int = 16, num_val: int = 4, size=(256, 256),
                seed: int = 0, progress: Optional[Callable[[str], None]] = None) -> Dict:
    """ADEChallengeData2016 layout: ``images/{training,validation}/ADE_*.jpg`` and
    ``annotations/{training,validation}/ADE_*.png`` label maps (values 0..150)."""
    rng = np.random.default_rng(seed)
    counts = {}
    for split, tag, num in (('training', 'train', num_train), ('validation', 'val', num_val)):
        for sub in ('images', 'annotations'):
            os.makedirs(osp.join(root, sub, split), exist_ok=True)
        for idx in range(num):
            image = _canvas(rng, *size)
            label = Image.new('L', size, ADE_BACKGROUND)
            draw, draw_label = ImageDraw.Draw(image), ImageDraw.Draw(label)
            for box in _random_boxes(rng, *size, int(rng.integers(1, 4))):
                value, shape, colour = ADE_SHAPES[int(rng.integers(len(ADE_SHAPES)))]
                poly = _polygon(shape, box)
                draw.polygon(poly, fill=colour)
                draw_label.polygon(poly, fill=value)
            name = f'ADE_{tag}_{idx + 1:08d}'
            image.save(osp.join(root, 'images', split, name + '.jpg'), quality=95)
            label.save(osp.join(root, 'annotations', split, name + '.png'))
        counts[split] = num
        if progress:
            progress(f'ADE20K {split}: {num} images with label maps')
    return counts


def make_imagenet(root: str, num_train: int = 8, num_val: int = 2, size=(64, 64),
                  seed: int = 0, progress: Optional[Callable[[str], None]] = None) -> Dict:
    """ImageNet layout: ``train/<wnid>/*.JPEG``, ``val/*.JPEG`` and ``meta/{train,val}.txt``
    (``path label`` per line); ``num_train``/``num_val`` images per class."""
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(root, 'meta'), exist_ok=True)
    os.makedirs(osp.join(root, 'val'), exist_ok=True)
    lines = dict(train=[], val=[])
    for label, wnid in IMAGENET_CLASSES:
        os.makedirs(osp.join(root, 'train', wnid), exist_ok=True)
        shape = ('rectangle', 'ellipse', 'triangle', 'rectangle')[label]
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        for split, num in (('train', num_train), ('val', num_val)):
            for idx in range(num):
                image = _canvas(rng, *size)
                box = _random_boxes(rng, *size, 1, 0.4, 0.8)[0]
                ImageDraw.Draw(image).polygon(_polygon(shape, box), fill=colour)
                if split == 'train':
                    rel = f'{wnid}/{wnid}_{idx + 1}.JPEG'
                else:
                    rel = f'ILSVRC2012_val_{len(lines["val"]) + 1:08d}.JPEG'
                image.save(osp.join(root, split, rel), quality=95)
                lines[split].append(f'{rel} {label}')
    for split, split_lines in lines.items():
        with open(osp.join(root, 'meta', f'{split}.txt'), 'w') as f:
            f.write('\n'.join(split_lines) + '\n')
        if progress:
            progress(f'ImageNet {split}: {len(split_lines)} images, '
                     f'{len(IMAGENET_CLASSES)} classes')
    return {split: len(split_lines) for split, split_lines in lines.items()}


def natural_images(num: int, size: int = 224, seed: int = 0):
    """``num`` natural-looking RGB images (smooth light gradients, texture noise, a few
    filled shapes) as a float (num, 3, size, size) tensor normalised with ImageNet's mean
    and standard deviation, as the classifiers' data preprocessor would hand them over."""
    import torch
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(num):
        a, b = rng.uniform(-60, 60, size=(2, 3))
        base = rng.integers(70, 190, size=3) + a * xx[..., None] + b * yy[..., None]
        noise = rng.normal(0, 10, size=(size, size, 3))
        image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for box in _random_boxes(rng, size, size, int(rng.integers(1, 4))):
            shape = ('rectangle', 'ellipse', 'triangle')[int(rng.integers(3))]
            draw.polygon(_polygon(shape, box), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        images.append(np.asarray(image, dtype=np.float32))
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    batch = (np.stack(images) - mean) / std
    return torch.from_numpy(batch.astype(np.float32)).permute(0, 3, 1, 2).contiguous()


#: The generated datasets, by name: (task library, folder under ``data_root`` where the
#: configs look for it, maker).
DATASETS = dict(
    coco=('mmdet', 'coco', make_coco),
    ade20k=('mmseg', osp.join('ade', 'ADEChallengeData2016'), make_ade20k),
    imagenet=('mmpretrain', 'imagenet', make_imagenet))


def dataset_dir(data_root: str, task: str) -> str:
    """Where the generated dataset of ``task`` ('mmdet', 'mmseg', 'mmpretrain') lies under
    ``data_root``."""
    dirs = {t: folder for t, folder, _ in DATASETS.values()}
    if task not in dirs:
        raise ValueError(f'`task` must be one of {sorted(dirs)}, got {task!r}')
    return osp.join(data_root, dirs[task])


def make_datasets(data_root: str = 'data',
                  tasks=tuple(DATASETS),
                  num_train: Optional[int] = None,
                  num_val: Optional[int] = None,
                  seed: int = 0,
                  progress: Optional[Callable[[str], None]] = None) -> Dict:
    """Write the generated datasets where the configs look for them: ``<data_root>/coco``,
    ``<data_root>/ade/ADEChallengeData2016`` and ``<data_root>/imagenet``. ``num_train`` and
    ``num_val`` (images; per class for ImageNet) replace each maker's defaults."""
    unknown = [t for t in tasks if t not in DATASETS]
    if unknown:
        raise ValueError(f'make_datasets: unknown tasks {unknown}; allowed: {sorted(DATASETS)}')
    sizes = {k: v for k, v in dict(num_train=num_train, num_val=num_val).items() if v}
    return {
        name: DATASETS[name][2](osp.join(data_root, DATASETS[name][1]), seed=seed,
                                progress=progress, **sizes)
        for name in tasks
    }
