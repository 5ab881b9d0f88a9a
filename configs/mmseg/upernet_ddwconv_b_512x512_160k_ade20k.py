# UPerNet + FCN auxiliary head, 160k iterations on ADE20K (512x512) with a D-DW-Conv-B backbone
# (ImageNet-1K pre-trained). Paper Table 3: 195M params, 1129G FLOPs, 48.0 mIoU (single scale).
_base_ = './upernet_dwconv_b_512x512_160k_ade20k.py'

checkpoint = 'checkpoints/ddwconv_b_in1k.pth'
model = dict(
    backbone=dict(
        conv_type='ddw',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')))
