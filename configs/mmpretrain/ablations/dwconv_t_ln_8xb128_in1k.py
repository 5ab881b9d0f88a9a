# Ablation, paper Table 12: DW-Conv-T with LayerNorm over channels in place of every block
# BatchNorm: 81.2 top-1 (BN: 81.3). MMPretrain's LN2d (channels of (B, C, H, W) maps).
# Recipe as configs/mmpretrain/dwconv_t_8xb128_in1k.py.
_base_ = '../dwconv_t_8xb128_in1k.py'

model = dict(backbone=dict(norm_cfg=dict(type='LN2d', eps=1e-6)))
