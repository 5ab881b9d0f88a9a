# Ablation, paper appendix E / Table 14: fine-tune DW-Conv-T, trained at 224x224, at 384x384
# keeping the 7x7 kernels: 24M params, 11.1G FLOPs, 82.2 top-1.
# The paper's settings: 30 epochs, lr 1e-5, weight decay 1e-8, drop path 0.1. Chosen here
# (not stated): batch 1024 as in pre-training, 5 linear warm-up epochs then cosine to 0 as
# Swin's fine-tuning, augmentations as in pre-training; evaluation resizes the short side to
# 384 and takes the central 384x384 crop.
# Starts from configs/mmpretrain/dwconv_t_8xb128_in1k.py's checkpoint (`load_from`).
_base_ = '../dwconv_t_8xb128_in1k.py'

model = dict(backbone=dict(drop_path_rate=0.1))
load_from = 'checkpoints/dwconv_t_in1k.pth'

# the pre-training pipelines (Swin's) at 384
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=384, backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='RandAugment', policies='timm_increasing', num_policies=2, total_level=10,
         magnitude_level=9, magnitude_std=0.5,
         hparams=dict(pad_val=[104, 116, 124], interpolation='bicubic')),
    dict(type='RandomErasing', erase_prob=0.25, mode='rand', min_area_ratio=0.02,
         max_area_ratio=1 / 3, fill_color=[103.53, 116.28, 123.675],
         fill_std=[57.375, 57.12, 58.395]),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=384, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=384),
    dict(type='PackInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=1e-5, weight_decay=1e-8))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=5,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=0., by_epoch=True, begin=5)
]
train_cfg = dict(max_epochs=30)
