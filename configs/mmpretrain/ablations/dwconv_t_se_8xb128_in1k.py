# Ablation, paper Table 15: DW-Conv-T with squeeze-and-excitation after the depth-wise
# convolution (its norm and ReLU): 24M params, 3.8G FLOPs, 81.7 top-1.
# The paper does not give the SE details; this uses the standard form (MMPretrain's SELayer:
# global pooling, 1x1 conv C -> C/16 rounded up to a multiple of 8, ReLU, 1x1 conv, sigmoid).
# Recipe as configs/mmpretrain/dwconv_t_8xb128_in1k.py.
_base_ = '../dwconv_t_8xb128_in1k.py'

model = dict(backbone=dict(se_ratio=16))
