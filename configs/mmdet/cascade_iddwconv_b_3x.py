# Cascade Mask R-CNN 3x on COCO 2017 with a I-D-DW-Conv-B backbone (ImageNet-1K pre-trained).
# Paper Table 3: 137M params, 948G FLOPs, box AP 51.8, mask AP 44.8.
_base_ = './cascade_dwconv_b_3x.py'

checkpoint = 'checkpoints/iddwconv_b_in1k.pth'
model = dict(
    backbone=dict(
        conv_type='iddw',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')))
