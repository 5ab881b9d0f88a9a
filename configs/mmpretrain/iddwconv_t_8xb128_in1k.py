# I-D-DW-Conv-T on ImageNet-1K, 300 epochs at 224x224, 8 GPUs x 128 images.
# Paper Table 2: 26M params, 4.4G FLOPs, 81.8 top-1.
_base_ = './dwconv_t_8xb128_in1k.py'

model = dict(backbone=dict(conv_type='iddw'))
