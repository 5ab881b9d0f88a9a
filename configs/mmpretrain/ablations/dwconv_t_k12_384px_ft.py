# Ablation, paper appendix E / Table 14: fine-tune DW-Conv-T at 384x384 with its 7x7 kernels
# bicubically up-sampled to 12x12: 25M params, 11.5G FLOPs, 82.1 top-1.
# Prepare the checkpoint with
#   python tools/model_converters/resize_kernels.py checkpoints/dwconv_t_in1k.pth \
#       checkpoints/dwconv_t_in1k_k12.pth --kernel-size 12
# An even kernel keeps the map size with 6 zero rows/columns before and 5 after (tap i reads
# offset i - 6). Settings as dwconv_t_384px_ft.py.
_base_ = './dwconv_t_384px_ft.py'

model = dict(backbone=dict(kernel_size=12))
load_from = 'checkpoints/dwconv_t_in1k_k12.pth'
