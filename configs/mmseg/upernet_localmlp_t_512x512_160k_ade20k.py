# UPerNet 160k on ADE20K (512x512) with a Local MLP-T backbone (the static Swin-T, paper
# Tables 2, 4, 5; the paper reports no segmentation numbers for it). Window weights are
# shared across window positions, initialised from
# configs/mmpretrain/ablations/localmlp_t_sw_8xb128_in1k.py. Recipe as
# upernet_dwconv_t_512x512_160k_ade20k.py.
_base_ = './upernet_dwconv_t_512x512_160k_ade20k.py'

checkpoint = 'checkpoints/localmlp_t_sw_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='LocalMLP',
        arch='tiny',
        share_windows=True,
        pad_small_map=True,
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')))
