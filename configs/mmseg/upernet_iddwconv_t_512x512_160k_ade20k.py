# UPerNet + FCN auxiliary head, 160k iterations on ADE20K (512x512) with a I-D-DW-Conv-T backbone
# (ImageNet-1K pre-trained). Paper Table 3: 58M params, 939G FLOPs, 46.2 mIoU (single scale).
_base_ = './upernet_dwconv_t_512x512_160k_ade20k.py'

checkpoint = 'checkpoints/iddwconv_t_in1k.pth'
model = dict(
    backbone=dict(
        conv_type='iddw',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')))
