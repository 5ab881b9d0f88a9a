# Ablation, paper Tables 2 and 5: Local MLP-T, the static version of Swin-T: the query/key
# projections, dot product and softmax are removed and each head mixes the values of a
# window with learned static weights, one set per window position (Table 4: sharing across
# channels, not positions): 26M params, 3.8G FLOPs, 80.3 top-1.
# Chosen here (the paper does not say): mixing weights start N(0, 0.02) and, like Swin's
# relative-position tables, get no weight decay; shifted-window pairs from different image
# regions (masked in Swin) get zero weight. Swin-T's recipe (the base), 8 GPUs x 128.
_base_ = 'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py'
custom_imports = dict(imports=['mmdwnet'], allow_failed_imports=False)

model = dict(backbone=dict(type='LocalMLP', arch='tiny', img_size=224, drop_path_rate=0.2))

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'.mixing': dict(decay_mult=0.0)}))
auto_scale_lr = dict(base_batch_size=1024)

# the inherited visualizer carries mmengine's `_scope_`, which mmpretrain's
# tools/visualization/browse_dataset.py passes on to UniversalVisualizer (a TypeError)
visualizer = dict(_delete_=True, type='UniversalVisualizer',
                  vis_backends=[dict(type='LocalVisBackend')])
