# UPerNet + FCN auxiliary head, 160k iterations on ADE20K (512x512) with a DW-Conv-B backbone
# (ImageNet-1K pre-trained). Paper Table 3: 108M params, 1129G FLOPs, 48.3 mIoU (single scale).
_base_ = './upernet_dwconv_t_512x512_160k_ade20k.py'

checkpoint = 'checkpoints/dwconv_b_in1k.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,  # the paper gives T only (0.3); Swin-B's ADE20K rate too
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))
