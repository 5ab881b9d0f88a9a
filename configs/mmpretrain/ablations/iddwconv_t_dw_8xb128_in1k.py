# Ablation, paper Table 6: I-D-DW-Conv-T + DW, an extra residual depth-wise 7x7 convolution
# (with a BatchNorm in front) before every FFN, as Shuffle Transformer's neighbour-window
# connection: 27M params, 4.4G FLOPs, 82.3 top-1 (I-D-DW-T alone: 81.8).
# Recipe as configs/mmpretrain/iddwconv_t_8xb128_in1k.py.
_base_ = '../iddwconv_t_8xb128_in1k.py'

model = dict(backbone=dict(extra_dw=True))
