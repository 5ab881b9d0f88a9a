# Cascade Mask R-CNN 3x on COCO 2017 with a D-DW-Conv-B backbone (ImageNet-1K pre-trained).
# Paper Table 3: 219M params, 924G FLOPs, box AP 51.2, mask AP 44.4.
_base_ = './cascade_dwconv_b_3x.py'

checkpoint = 'checkpoints/ddwconv_b_in1k.pth'
model = dict(
    backbone=dict(
        conv_type='ddw',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')))
