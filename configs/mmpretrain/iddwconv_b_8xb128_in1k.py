# I-D-DW-Conv-B on ImageNet-1K, 300 epochs at 224x224, 8 GPUs x 128 images.
# Paper Table 2: 80M params, 14.3G FLOPs, 83.4 top-1.
_base_ = './dwconv_b_8xb128_in1k.py'

model = dict(backbone=dict(conv_type='iddw'))
