# Ablation, paper Table 4: DW-Conv-T with weight sharing across channels as well as
# positions: each 7x7 kernel is shared by a group of channels, as many groups as Swin-T's
# attention heads (3, 6, 12, 24; 32 channels per group): 23.9M params, 81.1 top-1
# (no sharing across channels: 24.2M, 81.3). Biases stay per channel.
# Recipe as configs/mmpretrain/dwconv_t_8xb128_in1k.py.
_base_ = '../dwconv_t_8xb128_in1k.py'

model = dict(backbone=dict(shared_kernel_groups=[3, 6, 12, 24]))
