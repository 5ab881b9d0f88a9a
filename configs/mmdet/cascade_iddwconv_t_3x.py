# Cascade Mask R-CNN 3x on COCO 2017 with a I-D-DW-Conv-T backbone (ImageNet-1K pre-trained).
# Paper Table 3: 84M params, 741G FLOPs, box AP 50.8, mask AP 44.0.
_base_ = './cascade_dwconv_t_3x.py'

checkpoint = 'checkpoints/iddwconv_t_in1k.pth'
model = dict(
    backbone=dict(
        conv_type='iddw',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')))
