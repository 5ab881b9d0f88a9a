# DW-Conv-T on ImageNet-1K, 300 epochs at 224x224, 8 GPUs x 128 images.
# Paper Table 2: 24M params, 3.8G FLOPs, 81.3 top-1.
# Swin's recipe (from the base): AdamW lr 1e-3 for batch 1024, weight decay 0.05, cosine with
# 20 warm-up epochs, RandAugment, Mixup 0.8, CutMix 1.0, random erasing 0.25, label smoothing
# 0.1; gradient clipping 5.0.
_base_ = 'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py'
custom_imports = dict(imports=['mmdwnet'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='DWNet',
        arch='tiny',
        conv_type='dw',
        drop_path_rate=0.2,
        out_indices=(3, )),
    head=dict(in_channels=768))

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader
optim_wrapper = dict(clip_grad=dict(max_norm=5.0))
auto_scale_lr = dict(base_batch_size=1024)

# the inherited visualizer carries mmengine's `_scope_`, which mmpretrain's
# tools/visualization/browse_dataset.py passes on to UniversalVisualizer (a TypeError)
visualizer = dict(_delete_=True, type='UniversalVisualizer',
                  vis_backends=[dict(type='LocalVisBackend')])
