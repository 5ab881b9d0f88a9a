# Ablation, paper Table 2: Local MLP-B, the static version of Swin-B (see
# localmlp_t_8xb128_in1k.py): 79M params, 12.9G FLOPs, 82.2 top-1. Swin-B's recipe (drop
# path 0.5), 8 GPUs x 128.
_base_ = 'mmpretrain::swin_transformer/swin-base_16xb64_in1k.py'
custom_imports = dict(imports=['mmdwnet'], allow_failed_imports=False)

model = dict(backbone=dict(type='LocalMLP', arch='base', img_size=224, drop_path_rate=0.5))

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'.mixing': dict(decay_mult=0.0)}))
auto_scale_lr = dict(base_batch_size=1024)

# the inherited visualizer carries mmengine's `_scope_`, which mmpretrain's
# tools/visualization/browse_dataset.py passes on to UniversalVisualizer (a TypeError)
visualizer = dict(_delete_=True, type='UniversalVisualizer',
                  vis_backends=[dict(type='LocalVisBackend')])
