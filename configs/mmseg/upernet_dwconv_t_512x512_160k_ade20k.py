# UPerNet + FCN auxiliary head, 160k iterations on ADE20K (512x512) with a DW-Conv-T backbone
# (ImageNet-1K pre-trained). Paper Table 3: 56M params, 928G FLOPs, 45.5 mIoU (single scale).
_base_ = 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py'  # noqa
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
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        norm_cfg=norm_cfg,
        out_norm_cfg=norm_cfg,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))

# AdamW lr 6e-5, weight decay 0.01 (none on norm layers, as for Swin); linear warm-up for
# 1500 iterations, then poly (power 1) decay to 0 at 160k (from the base); 8 GPUs x 2 images.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(norm_decay_mult=0.))
train_dataloader = dict(batch_size=2)
