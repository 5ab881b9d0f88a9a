# Ablation, paper Table 12: DW-Conv-T with centering-calibrated BatchNorm (the centering
# calibration of Representative BN, Gao et al. 2021: BN(x + w * per-instance channel mean),
# w learned per channel, zero at start) for every block norm: 81.7 top-1 (BN: 81.3).
# Recipe as configs/mmpretrain/dwconv_t_8xb128_in1k.py.
_base_ = '../dwconv_t_8xb128_in1k.py'

model = dict(backbone=dict(norm_cfg=dict(type='CCBN')))
