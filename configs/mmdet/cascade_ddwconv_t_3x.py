# Cascade Mask R-CNN 3x on COCO 2017 with a D-DW-Conv-T backbone (ImageNet-1K pre-trained).
# Paper Table 3: 108M params, 730G FLOPs, box AP 50.5, mask AP 43.7.
_base_ = './cascade_dwconv_t_3x.py'

checkpoint = 'checkpoints/ddwconv_t_in1k.pth'
model = dict(
    backbone=dict(
        conv_type='ddw',
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')))
