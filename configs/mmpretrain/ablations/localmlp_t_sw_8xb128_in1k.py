# Ablation, paper Table 4: Local MLP-T with its static window weights shared across window
# positions as well as across the channels of a head: 24.3M params, 80.3 top-1. Shared
# weights do not depend on the input size, so this is the ImageNet model of the Local MLP
# detection and segmentation configs. Otherwise as localmlp_t_8xb128_in1k.py.
_base_ = './localmlp_t_8xb128_in1k.py'

model = dict(backbone=dict(share_windows=True))
