# Cascade Mask R-CNN 3x on COCO 2017 with a DW-Conv-T backbone (ImageNet-1K pre-trained).
# Paper Table 3: 82M params, 730G FLOPs, box AP 49.9, mask AP 43.4.
# The stock mmdet recipe: FPN, 4conv1fc GIoU bbox heads, multi-scale + DETR-style crop, AMP.
_base_ = 'mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'  # noqa
custom_imports = dict(imports=['mmdwnet'], allow_failed_imports=False)

# ImageNet-1K weights of the backbone: trained with configs/mmpretrain/ or converted from the
# authors' release; a missing file means random initialisation (with a warning).
checkpoint = 'checkpoints/dwconv_t_in1k.pth'
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    backbone=dict(
        _delete_=True,
        type='DWNet',
        arch='tiny',
        conv_type='dw',
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        norm_cfg=norm_cfg,
        out_norm_cfg=norm_cfg,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')),
    neck=dict(in_channels=[96, 192, 384, 768]))

# AdamW lr 1e-4, weight decay 0.05 except on norm layers; 36 epochs, steps at 27 and 33
# (from the base), 8 GPUs x 2 images.
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.))
train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
