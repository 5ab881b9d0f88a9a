"""The DWNet backbone (mmdwnet/models/backbones/dwnet.py): sizes, outputs, arguments,
freezing, deploy folding of the whole network."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randomise_bn_stats
from torch.nn.modules.batchnorm import _BatchNorm

from mmdwnet.models import DWNet
from mmdwnet.models.utils import DynamicDWConv
from mmdwnet.utils import build_model, imagenet_classifier_cfg

# exact parameter counts of the authors' ImageNet classifiers (tests/data/official_dwnet_keys.json)
CLASSIFIER_PARAMS = {
    ('tiny', 'dw'): 24_172_744,
    ('tiny', 'ddw'): 51_131_752,
    ('tiny', 'iddw'): 26_244_280,
    ('base', 'dw'): 74_347_112,
    ('base', 'ddw'): 161_597_928,
    ('base', 'iddw'): 80_253_608,
}


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('arch,conv_type', list(CLASSIFIER_PARAMS))
def test_classifier_parameter_parity(arch, conv_type):
    # ImageClassifier(DWNet(arch, conv_type, out_indices=(3,)), GAP, LinearClsHead(1000))
    model = build_model(imagenet_classifier_cfg(arch, conv_type))
    assert model.backbone.out_indices == (3, ) and model.head.num_classes == 1000
    assert _num_params(model) == CLASSIFIER_PARAMS[(arch, conv_type)]


@pytest.mark.parametrize('conv_type', ['dw', 'ddw', 'iddw'])
@pytest.mark.parametrize('size', [(64, 64), (97, 131), (33, 40)])
def test_output_shapes_any_input_size(conv_type, size):
    model = DWNet('tiny', conv_type, out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *size))
    assert len(outs) == 4
    for i, out in enumerate(outs):
        stride = 2**(i + 2)
        assert out.shape == (2, 96 * 2**i, math.ceil(size[0] / stride),
                             math.ceil(size[1] / stride))
        assert torch.isfinite(out).all()


def test_out_indices_select_and_order():
    model = DWNet('tiny', out_indices=(1, -1)).eval()
    assert model.out_indices == (1, 3)
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [192, 768]
    assert hasattr(model, 'norm1') and hasattr(model, 'norm3') and not hasattr(model, 'norm0')


def test_default_output_norm_is_layernorm_over_channels():
    model = DWNet('tiny', out_indices=(3, )).eval()
    out, = model(torch.randn(2, 3, 64, 64))
    # unit weight, zero bias at init: every position normalised over its 768 channels
    assert isinstance(model.norm3, torch.nn.LayerNorm)
    torch.testing.assert_close(out.mean(1), torch.zeros(2, 2, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(1, unbiased=False), torch.ones(2, 2, 2), atol=1e-3,
                               rtol=0)


def test_dense_output_norms_from_out_norm_cfg():
    model = DWNet('tiny', out_indices=(0, 1, 2, 3), out_norm_cfg=dict(type='BN'))
    assert all(isinstance(getattr(model, f'norm{i}'), torch.nn.BatchNorm2d) for i in range(4))
    model = DWNet('tiny', out_indices=(0, 1, 2, 3), out_norm_cfg=dict(type='SyncBN'))
    assert all(type(getattr(model, f'norm{i}')).__name__ == 'SyncBatchNorm' for i in range(4))
    model = DWNet('tiny', out_indices=(2, ), out_norm_cfg=None)
    assert isinstance(model.norm2, torch.nn.Identity)


def test_stem_and_patch_merging_layout():
    model = DWNet('tiny', 'dw', out_indices=(0, 1)).eval()
    # stem: 4x4 stride-4 conv with bias, LayerNorm over channels
    assert model.patch_embed.projection.kernel_size == (4, 4)
    assert model.patch_embed.projection.stride == (4, 4)
    assert model.patch_embed.projection.bias is not None
    # merging: 2x2 neighbourhood -> LayerNorm(4C) -> bias-free Linear 4C -> 2C
    merge = model.stages[1].downsample
    assert merge.norm.normalized_shape == (384, ) and merge.reduction.bias is None
    assert tuple(merge.reduction.weight.shape) == (192, 384)
    x = torch.randn(1, 96, 5, 7)  # odd sizes: zero padded on the bottom / right
    y, hw = merge(x.flatten(2).transpose(1, 2), (5, 7))
    xp = F.pad(x, (0, 1, 0, 1))
    # unfold order: channel c of position (r, s) of the 2x2 window lands at 4c + 2r + s
    cols = torch.stack([xp[:, :, r::2, s::2] for r in (0, 1) for s in (0, 1)], 2)
    cols = cols.flatten(1, 2).flatten(2).transpose(1, 2)
    assert hw == (3, 4)
    torch.testing.assert_close(y, merge.reduction(merge.norm(cols)))


@pytest.mark.parametrize('kernel_size', [7, 6])  # 6: the operators' PyTorch paths on CPU
@pytest.mark.parametrize('conv_type', ['dw', 'ddw', 'iddw'])
def test_training_gradients_stay_channels_last(conv_type, kernel_size):
    """Every BatchNorm backward gets a channels-last gradient for its channels-last input:
    PyTorch's mixed-layout BatchNorm backward is several times slower (issue 5)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    model = DWNet(dict(embed_dims=16, depths=[1, 2, 1], group_channels=[4, 4, 4]),
                  conv_type, kernel_size=kernel_size, out_indices=(2, )).train()
    layouts = []

    class Spy(TorchDispatchMode):

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.native_batch_norm_backward.default:
                grad, x = args[:2]
                layouts.append((grad.is_contiguous(memory_format=torch.channels_last),
                                x.is_contiguous(memory_format=torch.channels_last)))
            return func(*args, **(kwargs or {}))

    out = model(torch.randn(2, 3, 64, 64))[0]
    with Spy():
        out.mean().backward()
    # 4 norms per block (pw1, depth-wise, pw2, FFN) plus the dynamic predictors' norms
    assert len(layouts) >= 4 * 4
    assert layouts == [(True, True)] * len(layouts)


@pytest.mark.parametrize('scope', ['mmpretrain', 'mmdet', 'mmseg'])
def test_registry_builds_in_every_scope(scope):
    import importlib

    from mmengine.registry import DefaultScope
    registry = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        for type_name in ('DWNet', 'mmdwnet.DWNet'):
            model = registry.build(dict(type=type_name, arch='tiny', conv_type='iddw'))
            assert type(model) is DWNet
            assert model.conv_type == 'iddw'


def test_registering_as_in_mmyolo_reaches_every_library():
    """``@mmdwnet.registry.MODELS.register_module()`` registers where mmdet, mmseg and
    mmpretrain all look (mmengine's root), not into a child they cannot reach."""
    import importlib

    from mmengine.registry import MODELS as MMENGINE_MODELS
    from torch import nn

    from mmdwnet.registry import MODELS

    assert MODELS is MMENGINE_MODELS

    @MODELS.register_module(force=True)
    class ContributedBackbone(nn.Module):
        pass

    try:
        for scope in ('mmpretrain', 'mmdet', 'mmseg'):
            registry = importlib.import_module(f'{scope}.registry').MODELS
            assert registry.get('ContributedBackbone') is ContributedBackbone, scope
    finally:
        MODELS._module_dict.pop('ContributedBackbone')


def test_frozen_stages():
    model = DWNet('tiny', 'ddw', out_indices=(0, 1, 2, 3), frozen_stages=2)
    model.train()
    frozen = [model.patch_embed, model.stages[0], model.stages[1], model.norm0, model.norm1]
    live = [model.stages[2], model.stages[3], model.norm2, model.norm3]
    for m in frozen:
        assert all(not p.requires_grad for p in m.parameters())
        assert all(not sub.training for sub in m.modules())
    for m in live:
        assert all(p.requires_grad for p in m.parameters())
        assert all(sub.training for sub in m.modules())
    sum(o.sum() for o in model(torch.randn(2, 3, 64, 64))).backward()
    for m in frozen:
        assert all(p.grad is None for p in m.parameters())
    for m in live:
        assert all(p.grad is not None for p in m.parameters())
    # frozen BNs keep their running statistics
    mean = model.stages[0].blocks[0].norm1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(model.stages[0].blocks[0].norm1.running_mean, mean)


def test_norm_eval():
    model = DWNet('tiny', 'iddw', norm_eval=True, out_norm_cfg=dict(type='BN'))
    model.train()
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(bns) > 40 and all(not m.training for m in bns)
    assert model.stages[0].blocks[0].ffn.training
    model.train(False)
    model.train(True)
    assert all(not m.training for m in bns)


@pytest.mark.parametrize('conv_type', ['dw', 'ddw', 'iddw'])
def test_with_cp_same_outputs_and_gradients(conv_type):
    torch.manual_seed(0)
    plain = DWNet('tiny', conv_type, out_indices=(0, 1, 2, 3))
    ckpt = DWNet('tiny', conv_type, out_indices=(0, 1, 2, 3), with_cp=True)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.stages[2].blocks[0].with_cp and not plain.stages[2].blocks[0].with_cp
    x = torch.randn(2, 3, 48, 48)
    results = []
    for model in (plain, ckpt):
        model.train()
        outs = model(x)
        sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        results.append((outs, {n: p.grad for n, p in model.named_parameters()}))
    (outs_a, grads_a), (outs_b, grads_b) = results
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_drop_path_rates_grow_linearly():
    model = DWNet('tiny', drop_path_rate=0.2)
    rates = [b.drop_path.drop_prob for s in model.stages for b in s.blocks]
    assert len(rates) == 12
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.2, 12))
    assert model.stages[3].blocks[1].ffn.dropout_layer.drop_prob == pytest.approx(0.2)


def test_get_layer_depth():
    model = DWNet('tiny', 'ddw')
    depths = {name: model.get_layer_depth('backbone.' + name, 'backbone.')
              for name, _ in model.named_parameters()}
    assert set(n for _, n in depths.values()) == {14}
    assert depths['patch_embed.projection.weight'] == (0, 14)
    assert depths['stages.0.blocks.1.pw_conv1.weight'] == (2, 14)
    assert depths['stages.2.downsample.reduction.weight'] == (5, 14)
    assert depths['stages.2.blocks.0.dw_conv.conv2.weight'] == (5, 14)
    assert depths['stages.3.blocks.1.ffn.layers.1.weight'] == (12, 14)
    assert depths['norm3.weight'] == (13, 14)
    assert model.get_layer_depth('head.fc.weight', 'backbone.') == (13, 14)
    assert sorted(set(d for d, _ in depths.values())) == list(range(14))


def test_arch_dict():
    model = DWNet(dict(embed_dims=32, depths=[1, 2], group_channels=[4, 8]), 'iddw',
                  out_indices=(0, 1))
    outs = model(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 8, 8), (2, 64, 4, 4)]
    assert model.stages[1].blocks[0].dw_conv.groups == 8


# ------------------------------------------------------------------ bad input ---
@pytest.mark.parametrize('kwargs,error,pattern', [
    (dict(arch='small'), ValueError,
     r"`arch` must be one of \['b', 'base', 't', 'tiny'\] .* got 'small'"),
    (dict(arch=3), TypeError, r'`arch` must be a str or a dict, got int 3'),
    (dict(arch=dict(embed_dims=96, depths=[2, 2])), ValueError,
     r"misses the keys \['group_channels'\]"),
    (dict(arch=dict(embed_dims=96, depths=[2, 2], group_channels=[3])), ValueError,
     r"`arch\['group_channels'\]` must be a list of 2 positive ints .* got \[3\]"),
    (dict(arch=dict(embed_dims=96, depths=[2, 2], group_channels=[5, 6]), conv_type='iddw'),
     ValueError, r"stage 0 has 96 channels, which `arch\['group_channels'\]\[0\]` = 5 must "
     'divide'),
    (dict(arch=dict(embed_dims=90, depths=[2], group_channels=[3]), conv_type='ddw'),
     ValueError, r'stage 0 has 90 channels, but .* 4 must divide them'),
    (dict(conv_type='conv'), ValueError,
     r"`conv_type` must be one of \('dw', 'ddw', 'iddw'\), got 'conv'"),
    (dict(out_indices=(0, 4)), ValueError,
     r'`out_indices` \(0, 4\) contains 4; allowed stage indices are 0..3'),
    (dict(out_indices='3'), TypeError, r"`out_indices` must be an int or a sequence of ints, "
     "got '3'"),
    (dict(frozen_stages=5), ValueError, r'`frozen_stages` must be an int in \[-1, 4\], got 5'),
    (dict(frozen_stages=-2), ValueError, r'`frozen_stages` must be an int in \[-1, 4\], got -2'),
    (dict(kernel_size=0), ValueError, r'`kernel_size` must be a positive int, got 0'),
])
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        DWNet(**kwargs)


def test_bad_inputs():
    model = DWNet('tiny').eval()
    with pytest.raises(ValueError,
                       match=r'input must have shape \(B, 3, H, W\), got \(3, 64, 64\)'):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError,
                       match=r'input must have shape \(B, 3, H, W\), got \(1, 1, 64, 64\)'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(TypeError, match='input must be a torch.Tensor, got ndarray'):
        model(torch.randn(1, 3, 64, 64).numpy())
    gray = DWNet('tiny', in_channels=1).eval()
    assert gray(torch.randn(1, 1, 32, 32))[0].shape == (1, 768, 1, 1)
    with pytest.raises(TypeError, match=r'floating-point tensor, got dtype torch.uint8; '
                       r'normalise the images first'):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


@pytest.mark.parametrize('size', [(64, 64), (97, 131), (33, 40)])
def test_empty_batch_gives_empty_outputs(size):
    """(0, 3, H, W) gives (0, C_i, H_i, W_i) maps, the sizes one image gets."""
    model = DWNet('tiny', 'iddw', out_indices=(0, 1, 2, 3)).eval()
    empty = model(torch.randn(0, 3, *size))
    with torch.no_grad():
        one = model(torch.randn(1, 3, *size))
    assert [tuple(e.shape) for e in empty] == [(0, ) + tuple(o.shape[1:]) for o in one]


@pytest.mark.parametrize('conv_type', ['dw', 'ddw', 'iddw'])
def test_switch_to_deploy_folds_batchnorm(conv_type, tmp_path):
    """Folded BatchNorms give the same outputs (1e-4), no block BatchNorm is left, and the
    folded weights load into a model built with deploy=True."""
    model = DWNet('tiny', conv_type, out_indices=(0, 1, 2, 3)).eval()
    randomise_bn_stats(model)
    for m in model.modules():
        if isinstance(m, DynamicDWConv):
            m.bias.data.uniform_(-0.2, 0.2)  # the folded output norm changes this bias
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = model(x)
        model.switch_to_deploy()
        model.switch_to_deploy()  # idempotent
        folded = model(x)
    for e, f in zip(expected, folded):
        torch.testing.assert_close(f, e, atol=1e-4, rtol=0)
    norms = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    assert norms == []
    if conv_type == 'iddw':
        # I-D-DW kernels are shared by the channels of a group: the operator applies its
        # output norm (buffers, 2 * 4416 values fewer parameters) and ReLU
        blocks = [b for stage in model.stages for b in stage.blocks]
        assert all(b.dw_conv.out_scale.shape == (b.dw_conv.conv1.in_channels, )
                   and b.dw_conv.out_relu and type(b.act2) is torch.nn.Identity
                   for b in blocks)
    expected_params = {'dw': 23_378_592, 'ddw': 50_336_496, 'iddw': 25_447_920}[conv_type]
    assert _num_params(model) == expected_params
    deployed = DWNet('tiny', conv_type, out_indices=(0, 1, 2, 3), deploy=True).eval()
    deployed.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        for e, d in zip(expected, deployed(x)):
            torch.testing.assert_close(d, e, atol=1e-4, rtol=0)


def test_switch_to_deploy_keeps_other_norms():
    model = DWNet('tiny', 'dw', norm_cfg=dict(type='GN', num_groups=8)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)[0]
        model.switch_to_deploy()
        torch.testing.assert_close(model(x)[0], expected)
    assert model.stages[0].blocks[0].norm1.__class__.__name__ == 'GroupNorm'


@pytest.mark.parametrize('name', ['dwconv_t', 'ddwconv_t', 'iddwconv_t'])
def test_bf16_classifier_agrees_with_fp32(name):
    """The whole classifier in deploy form under bfloat16 autocast on natural-looking
    images, against float32 (what ``tools/benchmark.py --dtype bf16`` reports). No released
    weights are reachable here: the random model is conditioned as training conditions it
    (``trained_like``: BatchNorm statistics of the images, residual branches at 0.3)."""
    from analysis_tools.benchmark_utils import (build_classifier, inference_model,
                                                precision_agreement, trained_like)
    from mmdwnet.testing import natural_images
    torch.manual_seed(0)
    images = natural_images(8, 224)
    model = trained_like(build_classifier(name), images)
    result = precision_agreement(inference_model(model, fuse=True)[0], images, 'bf16')
    # measured on an AMD EPYC (AVX-512 BF16): 0.8-1.4% of the logit range, 8 of 8 images
    assert result['max_logit_diff'] <= 0.03 * result['logit_range'], result
    assert result['top1_agreement'] >= 7 / 8, result
