# Cascade Mask R-CNN 3x on COCO 2017 with a Local MLP-T backbone (the static Swin-T, paper
# Tables 2, 4, 5; the paper reports no detection numbers for it). Window weights are shared
# across window positions (any input size), initialised from
# configs/mmpretrain/ablations/localmlp_t_sw_8xb128_in1k.py. Recipe as
# cascade_dwconv_t_3x.py.
_base_ = './cascade_dwconv_t_3x.py'

checkpoint = 'checkpoints/localmlp_t_sw_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='LocalMLP',
        arch='tiny',
        share_windows=True,
        pad_small_map=True,
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')))
