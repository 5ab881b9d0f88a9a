# Cascade Mask R-CNN 3x on COCO 2017 with a DW-Conv-B backbone (ImageNet-1K pre-trained).
# Paper Table 3: 132M params, 924G FLOPs, box AP 51.1, mask AP 44.2.
_base_ = './cascade_dwconv_t_3x.py'

checkpoint = 'checkpoints/dwconv_b_in1k.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,  # the paper gives T only (0.2); Swin-B's COCO rate
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')),
    neck=dict(in_channels=[128, 256, 512, 1024]))
