# UPerNet + FCN auxiliary head, 160k iterations on ADE20K (512x512) with a I-D-DW-Conv-B backbone
# (ImageNet-1K pre-trained). Paper Table 3: 114M params, 1153G FLOPs, 47.8 mIoU (single scale).
_base_ = './upernet_dwconv_b_512x512_160k_ade20k.py'

checkpoint = 'checkpoints/iddwconv_b_in1k.pth'
model = dict(
    backbone=dict(
        conv_type='iddw',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')))
