# DW-Conv-B on ImageNet-1K, 300 epochs at 224x224, 8 GPUs x 128 images.
# Paper Table 2: 74M params, 12.9G FLOPs, 83.2 top-1.
_base_ = './dwconv_t_8xb128_in1k.py'

model = dict(backbone=dict(arch='base', drop_path_rate=0.5), head=dict(in_channels=1024))
