import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from mmdwnet.models import DWNet
from mmdwnet.models.utils import DynamicDWConv, InhomogeneousDynamicDWConv
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


def _reference_stage1_block(block, x):
    """The DWNet block as the authors' code defines it, written out with functional calls
    (eval mode)."""

    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0., m.eps)

    y = F.relu(bn(block.norm1, F.conv2d(x, block.pw_conv1.weight)))
    y = F.conv2d(y, block.dw_conv.weight, block.dw_conv.bias, padding=3, groups=y.shape[1])
    y = F.relu(bn(block.norm2, y))
    y = bn(block.norm3, F.conv2d(y, block.pw_conv2.weight))
    x = x + y
    t = bn(block.ffn_norm, x).permute(0, 2, 3, 1)
    fc1, fc2 = block.ffn.layers[0][0], block.ffn.layers[1]
    t = F.linear(F.gelu(F.linear(t, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    return x + t.permute(0, 3, 1, 2)


def _randomise_bn_stats(model):
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def test_block_matches_spec():
    model = DWNet('tiny', 'dw').eval()
    _randomise_bn_stats(model)
    block = model.stages[0].blocks[0]
    x = torch.randn(2, 96, 9, 11)
    torch.testing.assert_close(block(x), _reference_stage1_block(block, x))


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


@pytest.mark.parametrize('size', [(6, 8), (5, 7)])
def test_channels_last_patch_merging_equals_mmcv(size, monkeypatch):
    from mmcv.cnn.bricks.transformer import PatchMerging

    from mmdwnet.models.utils import ChannelsLastPatchMerging
    torch.manual_seed(0)
    ours = ChannelsLastPatchMerging(8, 16)
    theirs = PatchMerging(8, 16, norm_cfg=dict(type='LN'))
    theirs.load_state_dict(ours.state_dict())  # same keys and shapes
    x = torch.randn(2, size[0] * size[1], 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ya, hwa), (yb, hwb) = ours(xa, size), theirs(xb, size)
    assert hwa == hwb == (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
    torch.testing.assert_close(ya, yb)
    # in inference on CPU the reduction is oneDNN's linear layer, with the same output
    calls = []
    onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, '_linear_pointwise',
                        lambda *args: calls.append(args[3]) or onednn(*args), raising=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, size)[0], yb, rtol=1e-5, atol=1e-5)
    assert calls == ['none']
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad)
    # the parameters are indexed to the gathering order: their gradients stay in mmcv's
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, theirs_params[name].grad)
    with pytest.raises(ValueError, match=r'input of length 48 does not match input_size '
                       r'\(5, 7\)'):
        ours(torch.randn(1, 48, 8), (5, 7))
    with pytest.raises(ValueError, match=r"`norm_cfg` must build a LayerNorm \(or be None\), "
                       r"got \{'type': 'BN1d'\}"):
        ChannelsLastPatchMerging(8, 16, norm_cfg=dict(type='BN1d'))
    without_norm = ChannelsLastPatchMerging(8, 16, norm_cfg=None)
    bare = PatchMerging(8, 16, norm_cfg=None)
    bare.load_state_dict(without_norm.state_dict())
    torch.testing.assert_close(without_norm(x, size)[0], bare(x, size)[0])


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


def test_homogeneous_dynamic_is_dynamic():
    torch.manual_seed(0)
    conv = DynamicDWConv(16, kernel_size=3).eval()
    _randomise_bn_stats(conv)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 16, 6, 5) + torch.randn(2, 16, 1, 1)  # different channel means
    y = conv(x)
    # per-sample kernels predicted from the pooled input, shared by all positions
    kernels = conv.conv2(F.relu(conv.norm(conv.conv1(x.mean((2, 3), keepdim=True)))))
    kernels = kernels.view(2, 16, 1, 3, 3)
    assert (kernels[0] - kernels[1]).abs().max() > 1e-2
    for b in range(2):
        expected = F.conv2d(x[b:b + 1], kernels[b], conv.bias, padding=1, groups=16)
        torch.testing.assert_close(y[b:b + 1], expected)
    # another sample in the batch does not change this sample's output
    x2 = x.clone()
    x2[1] = torch.randn(16, 6, 5)
    torch.testing.assert_close(conv(x2)[0], y[0])
    # the same input under the other sample's kernels gives another output: not static
    swapped = F.conv2d(x[1:2], kernels[0], conv.bias, padding=1, groups=16)
    assert (swapped - y[1:2]).abs().max() > 1e-2


def test_inhomogeneous_dynamic_uses_per_position_kernels():
    torch.manual_seed(0)
    conv = InhomogeneousDynamicDWConv(8, kernel_size=3, group_channels=2).eval()
    _randomise_bn_stats(conv)
    x = torch.randn(2, 8, 5, 6)
    weight = conv.conv2(F.relu(conv.norm(conv.conv1(x)))).view(2, 4, 3, 3, 5, 6)
    cols = F.unfold(x, 3, padding=1).view(2, 4, 2, 3, 3, 5, 6)
    expected = (cols * weight.unsqueeze(2)).sum((3, 4)).view(2, 8, 5, 6)
    torch.testing.assert_close(conv(x), expected)
    assert conv.conv1.bias is not None and conv.conv2.out_channels == 4 * 9


@pytest.mark.parametrize('grad', [False, True])
def test_inhomogeneous_dynamic_chunked_equals_whole_batch(monkeypatch, grad):
    """The kernels are predicted and applied (and, backward, predicted again) a few
    samples at a time; the chunks give exactly the whole batch's results."""
    from mmdwnet.ops import predicted_idwconv
    torch.manual_seed(0)
    conv = InhomogeneousDynamicDWConv(8, kernel_size=3, group_channels=2).eval()
    _randomise_bn_stats(conv)
    x = torch.randn(5, 8, 6, 7).contiguous(memory_format=torch.channels_last)

    def run():
        inputs = x.detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = conv(inputs)
        if not grad:
            return out, None
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view(out.shape).cos())
        return out, inputs.grad

    whole = run()
    per_sample = 4 * 9 * 6 * 7 * 4  # bytes of one sample's kernels
    budget = 2 * per_sample * (2 if grad else 1)  # backward holds kernels and gradients
    monkeypatch.setitem(predicted_idwconv.CHUNK_BYTES, 'cpu', budget)  # chunks 2, 2, 1
    assert predicted_idwconv._chunks(x, 36 * (2 if grad else 1)) == [(0, 2), (2, 4), (4, 5)]
    chunked = run()
    torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=0)
    assert chunked[0].is_contiguous(memory_format=torch.channels_last)
    if grad:
        torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=0)


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


def test_pretrained_init_with_prefix(tmp_path):
    source = DWNet('tiny', 'iddw')
    state = {f'backbone.{k}': v + 1 for k, v in source.state_dict().items()}
    state['head.fc.weight'] = torch.zeros(3, 768)
    torch.save({'state_dict': state}, tmp_path / 'cls.pth')
    model = DWNet(
        'tiny',
        'iddw',
        init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'cls.pth'),
                      prefix='backbone.'))
    model.init_weights()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[f'backbone.{k}'], msg=k)
    # a prefix no key has: a clear error, not mmengine's bare assertion
    wrong = DWNet('tiny', 'iddw', init_cfg=dict(
        type='Pretrained', prefix='encoder', checkpoint=str(tmp_path / 'cls.pth')))
    with pytest.raises(ValueError, match=r"no key of the checkpoint .*cls\.pth starts with "
                       r"the init_cfg `prefix` 'encoder\.'"):
        wrong.init_weights()


def test_pretrained_init_without_prefix_logs_what_it_left(tmp_path, monkeypatch):
    from mmdwnet.models.utils import pretrained
    source = DWNet('tiny', 'dw', out_indices=(0, 3))
    state = {k: v + 1 for k, v in source.state_dict().items() if not k.startswith('norm0')}
    state['stages.0.blocks.0.pw_conv1.weight'] = torch.zeros(5, 5, 1, 1)  # mis-shaped
    state['extra.weight'] = torch.zeros(2)
    torch.save(state, tmp_path / 'plain.pth')  # a bare state dict
    messages = []
    monkeypatch.setattr(pretrained, 'print_log', lambda msg, logger=None: messages.append(msg))
    model = DWNet('tiny', 'dw', out_indices=(0, 3),
                  init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'plain.pth')))
    model.init_weights()
    own = model.state_dict()
    for k, v in state.items():
        if k in own and k != 'stages.0.blocks.0.pw_conv1.weight':
            assert torch.equal(own[k], v), k
    lines = messages[0].splitlines()
    assert lines[0] == (f'DWNet: initialised {len(own) - 3} of {len(own)} backbone tensors '
                        f"from {tmp_path / 'plain.pth'} (all keys).")
    assert lines[1:] == [
        '  not loaded (shape (5, 5, 1, 1) in the checkpoint, (96, 96, 1, 1) here): '
        'stages.0.blocks.0.pw_conv1.weight',
        '  not loaded (not a parameter of this backbone): extra.weight',
        '  kept at initialisation (nothing loaded into them): norm0.bias, norm0.weight, '
        'stages.0.blocks.0.pw_conv1.weight']


def test_imagenet_checkpoint_initialises_a_dense_backbone(tmp_path, monkeypatch):
    from mmdwnet.models.utils import pretrained
    classifier = build_model(imagenet_classifier_cfg('tiny', 'iddw'))
    with torch.no_grad():
        for p in classifier.parameters():
            p.add_(torch.randn_like(p))
    path = str(tmp_path / 'in1k.pth')
    torch.save({'state_dict': classifier.state_dict(), 'meta': {}}, path)
    messages = []
    monkeypatch.setattr(pretrained, 'print_log',
                        lambda msg, logger=None, level=None: messages.append(msg))
    dense = DWNet('tiny', 'iddw', out_indices=(0, 1, 2, 3), out_norm_cfg=dict(type='BN'),
                  init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    dense.init_weights()
    source = classifier.state_dict()
    own = dense.state_dict()
    copied = [k for k in own if not k.startswith('norm')]
    assert len(copied) == len(own) - 4 * 5
    for key in copied:  # every backbone tensor that exists in both
        assert torch.equal(own[key], source['backbone.' + key]), key
    for i in range(4):  # fresh BN output norms, not the classifier's final LayerNorm
        assert torch.equal(own[f'norm{i}.weight'], torch.ones_like(own[f'norm{i}.weight']))
        assert torch.equal(own[f'norm{i}.running_mean'],
                           torch.zeros_like(own[f'norm{i}.running_mean']))
    log, = messages
    lines = log.splitlines()
    assert lines[0] == (f'DWNet: initialised {len(copied)} of {len(own)} backbone tensors '
                        f"from {path} (the keys under the prefix 'backbone.').")
    assert ('  not loaded (norm3 is another kind of norm here (BatchNorm2d)): '
            'backbone.norm3.weight, backbone.norm3.bias') in lines
    fresh = [ln for ln in lines if ln.startswith('  kept at initialisation')][0]
    assert fresh.count('norm') == 20 and 'norm0.running_var' in fresh


def test_missing_pretrained_checkpoint_warns_and_inits_randomly(tmp_path, monkeypatch):
    import logging

    from mmdwnet.models.utils import pretrained
    messages = []
    monkeypatch.setattr(pretrained, 'print_log',
                        lambda msg, logger=None, level=None: messages.append((msg, level)))
    missing = str(tmp_path / 'no.pth')
    model = DWNet('tiny', init_cfg=dict(type='Pretrained', checkpoint=missing,
                                        prefix='backbone.'))
    model.init_weights()
    (msg, level), = messages
    assert level == logging.WARNING
    assert f"the pretrained checkpoint '{missing}' of init_cfg does not exist" in msg
    assert 'random initialisation' in msg
    assert model.init_cfg == DWNet.default_init_cfg
    # the default init ran: LayerNorms at one, Linear biases at zero
    assert torch.equal(model.norm3.weight, torch.ones(768))
    assert torch.equal(model.stages[0].blocks[0].ffn.layers[1].bias, torch.zeros(96))


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


def test_ddw_batch_of_one_in_training():
    """D-DW's predictor BatchNorm sees one pooled vector per image: a batch of 1 in training
    is a clear error naming the remedies; each remedy works; the predictor norm is
    configurable apart from the block norms."""
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"DynamicDWConv: the kernel predictor normalises one "
                       r"pooled vector per image with BatchNorm2d.*batch of 1.*2 or more "
                       r"images per device.*SyncBN.*norm_eval=True.*predictor_norm_cfg"):
        DWNet('tiny', 'ddw').train()(x)
    gn = DWNet('tiny', 'ddw', predictor_norm_cfg=dict(type='GN', num_groups=1)).train()
    assert gn(x)[0].shape == (1, 768, 2, 2)
    block = gn.stages[0].blocks[0]
    assert isinstance(block.dw_conv.norm, torch.nn.GroupNorm)
    assert isinstance(block.norm1, _BatchNorm) and isinstance(block.norm2, _BatchNorm)
    assert DWNet('tiny', 'ddw', norm_eval=True).train()(x)[0].shape == (1, 768, 2, 2)
    assert DWNet('tiny', 'ddw').train()(torch.randn(2, 3, 64, 64))[0].shape == (2, 768, 2, 2)
    # the default keeps the checkpoints' keys
    assert 'stages.0.blocks.0.dw_conv.norm.running_mean' in DWNet('tiny', 'ddw').state_dict()


@pytest.mark.parametrize('conv_type', ['dw', 'ddw', 'iddw'])
def test_switch_to_deploy_folds_batchnorm(conv_type, tmp_path):
    """Folded BatchNorms give the same outputs (1e-4), no block BatchNorm is left, and the
    folded weights load into a model built with deploy=True."""
    model = DWNet('tiny', conv_type, out_indices=(0, 1, 2, 3)).eval()
    _randomise_bn_stats(model)
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
    # I-D-DW kernels are shared by the channels of a group: its output norm stays
    assert norms == ([f'stages.{i}.blocks.{j}.norm2' for i, d in enumerate(model.depths)
                      for j in range(d)] if conv_type == 'iddw' else [])
    expected_params = {'dw': 23_378_592, 'ddw': 50_336_496, 'iddw': 25_456_752}[conv_type]
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


@pytest.mark.parametrize('conv_type', ['dw', 'ddw', 'iddw'])
def test_bf16_block_agrees_with_fp32(conv_type):
    """One block in deploy form (BatchNorms folded, statistics from natural images) under
    bfloat16 autocast: every operator and the folded layers in bfloat16, within a few
    bfloat16 roundings of float32."""
    from mmdwnet.models.backbones.dwnet import DWBlock
    from mmdwnet.testing import natural_images
    torch.manual_seed(0)
    stem = DWNet('tiny', conv_type).patch_embed
    with torch.no_grad():
        x, (h, w) = stem(natural_images(4, 112))
        x = x.transpose(1, 2).reshape(4, -1, h, w).contiguous(memory_format=torch.channels_last)
    block = DWBlock(96, conv_type, group_channels=3)
    with torch.no_grad():  # BatchNorm statistics of these features, then fold
        for m in block.modules():
            if isinstance(m, _BatchNorm):
                m.momentum = None
        block.train()(x)
    block.eval().switch_to_deploy()
    # every BatchNorm folded, but the one after I-D-DW (group-shared kernels cannot take it)
    left = [m for m in block.modules() if isinstance(m, _BatchNorm)]
    assert left == ([block.norm2] if conv_type == 'iddw' else [])
    with torch.no_grad():
        reference = block(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = block(x)
    # the residual stream keeps the input's float32; every branch ran in bfloat16
    assert low.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(low, reference)
    error = ((low.float() - reference).abs().max() / reference.abs().max()).item()
    assert error < 2**-6, error  # measured about 2**-7 for each operator


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


@pytest.mark.parametrize('conv_type', ['dw', 'iddw'])
def test_deploy_fuses_layers(monkeypatch, conv_type):
    """switch_to_deploy turns the first 1x1 conv + ReLU into one Conv2dReLU, the last 1x1
    conv + residual addition into one Conv2dAdd, the FFN's first Linear + GELU into one
    LinearGELU and its second Linear + residual addition into one LinearAdd, and the I-D-DW
    kernel predictor's first 1x1 conv + ReLU into one Conv2dReLU (same keys); without
    autograd on CPU in eval mode they run oneDNN's fused kernels, with autograd
    the separate layers, in training mode no fused additions, under bfloat16 autocast
    the products with their ReLU or GELU and no fused additions, all equal to the unfused
    block."""
    from mmdwnet.models.backbones.dwnet import DWBlock
    from mmdwnet.models.utils import Conv2dAdd, Conv2dReLU, LinearAdd, LinearGELU
    torch.manual_seed(0)
    block = DWBlock(16, conv_type, kernel_size=3, group_channels=4).eval()
    _randomise_bn_stats(block)
    keys = set(block.state_dict())
    x = torch.randn(2, 16, 5, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = block(x)
    block.switch_to_deploy()
    assert type(block.pw_conv1) is Conv2dReLU and type(block.pw_conv2) is Conv2dAdd
    assert type(block.ffn.layers[0][0]) is LinearGELU
    assert isinstance(block.ffn.layers[0][1], torch.nn.Identity)
    assert type(block.ffn.layers[1]) is LinearAdd
    iddw = conv_type == 'iddw'
    if iddw:
        assert type(block.dw_conv.conv1) is Conv2dReLU
        assert {'dw_conv.conv1.weight', 'dw_conv.conv1.bias'} <= set(block.state_dict())
    predictor = ['relu'] if iddw else []  # the I-D-DW predictor's conv + ReLU
    # the fused layers' keys are those of the layers they replace (biases from the folds)
    fused_keys = ('pw_conv', 'ffn.layers')
    assert {k for k in block.state_dict() if k.startswith(fused_keys)} == \
        {k for k in keys if k.startswith(fused_keys)} | {'pw_conv1.bias', 'pw_conv2.bias'}
    calls = []

    def spy(name, attr_index):  # records the pointwise operations of a fused kernel
        fused = getattr(torch.ops.mkldnn, name)

        class Spy:

            def __call__(self, *args):
                calls.append(args[attr_index])
                return fused(*args)

            def binary(self, *args):
                calls.append(args[attr_index + 1])
                return fused.binary(*args)

        monkeypatch.setattr(torch.ops.mkldnn, name, Spy(), raising=False)

    spy('_linear_pointwise', 3)
    spy('_convolution_pointwise', 7)
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert calls == ['relu', *predictor, 'add', 'gelu', 'add']
    with torch.enable_grad():
        out = block(x.requires_grad_())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    n = len(calls)
    assert n == 4 + iddw  # autograd took the separate layers
    block.train()
    for m in block.modules():  # I-D-DW's norm2 stays: its running statistics
        if isinstance(m, _BatchNorm):
            m.eval()
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert calls[n:] == ['relu', *predictor, 'gelu']  # training: no fused additions
    block.eval()
    n = len(calls)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        low = block(x)
    torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)
    # bfloat16: the additions unfused, the second layer oneDNN's plain linear layer; the
    # standard layers where this CPU has no oneDNN kernels for bfloat16 (AVX2 only)
    from mmdwnet.models.utils.fused_layers import onednn_dtypes
    assert calls[n:] == (['relu', *predictor, 'gelu', 'none']
                         if torch.bfloat16 in onednn_dtypes() else [])


def test_iddw_norm_and_relu_run_in_the_kernel(monkeypatch):
    """The I-D-DW block's norm2 (a BatchNorm, which cannot fold into kernels that the
    channels of a group share) and its ReLU run inside the fused CPU kernel in inference,
    before and after switch_to_deploy: neither the norm nor the registered operator is
    called; with autograd, the separate layers; the same outputs. A norm in training mode
    (batch statistics) is no affine map: the separate layers."""
    from mmdwnet.models.backbones.dwnet import DWBlock
    from mmdwnet.ops import predicted_idwconv as op_module
    torch.manual_seed(0)
    block = DWBlock(16, 'iddw', kernel_size=3, group_channels=4).eval()
    _randomise_bn_stats(block)
    x = torch.randn(2, 16, 5, 6).contiguous(memory_format=torch.channels_last)
    expected = block(x.clone().requires_grad_()).detach()  # autograd: the separate layers
    norm_calls, op_calls, forward = [], [], op_module._forward
    block.norm2.register_forward_hook(lambda *args: norm_calls.append(1))
    monkeypatch.setattr(op_module, '_forward', lambda *a: op_calls.append(1) or forward(*a))
    for deploy in (False, True):
        if deploy:
            block.switch_to_deploy()
        with torch.no_grad():
            out = block(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert norm_calls == [] and op_calls == [], deploy
    block.norm2.train()
    with torch.no_grad():
        block(x)
    assert norm_calls == [1] and op_calls == [1]
    # as a constant map the norm would get no gradient: refused under autograd
    with pytest.raises(ValueError, match='`out_norm` is applied as a constant affine map'):
        block.dw_conv(x, out_norm=block.norm2)


def test_linear_add():
    """LinearAdd is the nn.Linear called with one argument, identity + Linear(x) with two
    (fused or not), and keeps the sum in the identity's dtype under autocast."""
    from mmdwnet.models.utils import LinearAdd, LinearGELU
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4)
    fused = LinearAdd.from_linear(linear)
    x, identity = torch.randn(3, 5, 8), torch.randn(3, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), linear(x), rtol=0, atol=0)
        torch.testing.assert_close(fused(x, identity), identity + linear(x))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = fused(x, identity)  # float32 identity: the sum stays float32
            assert low.dtype == torch.float32
            torch.testing.assert_close(low, identity + linear(x).float())
            low = fused(x, identity.bfloat16())
            assert low.dtype == torch.bfloat16
            torch.testing.assert_close(low.float(), identity + linear(x), rtol=2e-2,
                                       atol=2e-2)
    with pytest.raises(TypeError, match=r'LinearGELU: input dtype torch.float64 differs '
                       r'from the weight dtype torch.float32'):
        with torch.no_grad():
            LinearGELU.from_linear(linear)(x.double())
    # float64 layers, which oneDNN does not take, run the standard layers
    linear.double()
    with torch.no_grad():
        torch.testing.assert_close(LinearGELU.from_linear(linear)(x.double()),
                                   F.gelu(linear(x.double())), rtol=0, atol=0)
        torch.testing.assert_close(LinearAdd.from_linear(linear)(x.double(), identity.double()),
                                   identity.double() + linear(x.double()), rtol=0, atol=0)


def test_add_to_product_in_place_only_where_nothing_changes():
    """add_to_product adds the identity into the product in place without autograd where
    the sum has the product's dtype and shape (broadcast identities included), and out of
    place under autograd, for a sum that promotes or broadcasts beyond the product, and
    while tracing; the same values every way."""
    from mmdwnet.models.utils.fused_layers import add_to_product
    torch.manual_seed(0)
    product, identity = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    expected = identity + product
    cases = [  # (identity, product, in place)
        (identity, product, True),
        (identity[0, 0], product, True),  # broadcast into the product's shape
        (identity.double(), product, False),  # promotes to float64
        (identity, product[:, :1], False),  # broadcasts the product
        (identity.bfloat16(), product, False),
    ]
    with torch.no_grad():
        for a, b, in_place in cases:
            want = a + b
            b = b.clone()
            out = add_to_product(a, b)
            assert (out is b) == in_place, (a.shape, a.dtype, b.shape)
            assert out.dtype == want.dtype and out.shape == want.shape
            torch.testing.assert_close(out, want, rtol=0, atol=0)
    leaf = product.clone().requires_grad_()
    scaled = leaf * 1
    out = add_to_product(identity, scaled)  # autograd: out of place, gradients flow
    assert out is not scaled
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(leaf.grad, torch.ones_like(leaf), rtol=0, atol=0)
    traced = torch.jit.trace(lambda a, b: add_to_product(a, b), (identity, product))
    assert 'add_' not in str(traced.graph)
    torch.testing.assert_close(traced(identity, product), expected, rtol=0, atol=0)


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_fused_convolutions(memory_format):
    """Conv2dReLU and Conv2dAdd equal ReLU(conv) and identity + conv (stride, padding,
    groups, either layout of the identity; float32, and under bf16 autocast with a float32
    identity the sum stays float32), return the input's memory format, and refuse string
    padding."""
    from mmdwnet.models.utils import Conv2dAdd, Conv2dReLU
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=memory_format)
    identity = torch.randn(2, 12, 5, 4).contiguous(memory_format=memory_format)
    relu, add = Conv2dReLU.from_conv(conv), Conv2dAdd.from_conv(conv)
    with torch.no_grad():
        torch.testing.assert_close(relu(x), F.relu(conv(x)))
        # outputs in the input's memory format, as torch's convolutions (no copies after)
        assert relu(x).is_contiguous(memory_format=memory_format)
        assert add(x, identity).is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(add(x), conv(x), rtol=0, atol=0)
        torch.testing.assert_close(add(x, identity), identity + conv(x))
        torch.testing.assert_close(add(x, identity.contiguous()), identity + conv(x))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = add(x, identity)
            assert low.dtype == torch.float32
            torch.testing.assert_close(low, identity + conv(x).float())
            low = relu(x)  # the ReLU inside oneDNN's bfloat16 convolution
            assert low.dtype == torch.bfloat16
            assert low.is_contiguous(memory_format=memory_format)
            torch.testing.assert_close(low, F.relu(conv(x)), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"Conv2dAdd: the convolution must have numeric zero "
                       r"padding, got padding='same', padding_mode='zeros'"):
        Conv2dAdd.from_conv(torch.nn.Conv2d(8, 8, 3, padding='same'))


@pytest.mark.parametrize('drop_prob', [0., 0.3])
def test_residual_drop_path_equals_mmcv(drop_prob):
    """residual_drop_path(identity, x, DropPath) is identity + DropPath(x): the same masks
    from the same random numbers (and the same generator state after), the same gradients;
    in eval mode and for other modules the module as it is."""
    from mmcv.cnn.bricks.drop import DropPath

    from mmdwnet.models.utils import residual_drop_path
    drop = DropPath(drop_prob).train()
    identity, x = torch.randn(8, 4, 3, 5), torch.randn(8, 4, 3, 5)
    ia, xa = identity.clone().requires_grad_(), x.clone().requires_grad_()
    ib, xb = identity.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    ours = residual_drop_path(ia, xa, drop)
    after_ours = torch.rand(1)
    torch.manual_seed(1)
    theirs = ib + drop(xb)
    after_theirs = torch.rand(1)
    torch.testing.assert_close(ours, theirs)
    assert torch.equal(after_ours, after_theirs)
    if drop_prob:  # some samples dropped, the others scaled
        dropped = (theirs - ib).flatten(1).abs().sum(1) == 0
        assert 0 < dropped.sum() < 8
    grad = torch.randn_like(ours)
    ours.backward(grad)
    theirs.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ia.grad, ib.grad)
    drop.eval()
    torch.testing.assert_close(residual_drop_path(identity, x, drop), identity + x, rtol=0,
                               atol=0)
    other = residual_drop_path(identity, x, torch.nn.Sequential(torch.nn.Identity()))
    torch.testing.assert_close(other, identity + x, rtol=0, atol=0)


@pytest.mark.parametrize('change', [None, 'ffn_drop', 'tanh_gelu', 'eval_no_grad'])
def test_block_ffn_trains_through_gelu_mlp(change, compiled_ops):
    """In training the FFN's linear-GELU-linear runs as one gelu_mlp (the compiled
    GELU-with-derivative pass) and computes mmcv's FFN(x, identity): outputs and gradients
    against the FFN itself in float64. With an active dropout between the layers, another
    GELU, or without autograd, the FFN's own layers run."""
    torch.manual_seed(0)
    block = DWNet('tiny', 'dw', drop_path_rate=0.).stages[0].blocks[0].train()
    if change == 'ffn_drop':
        block.ffn.layers[0][2].p = 0.1
    if change == 'tanh_gelu':
        block.ffn.layers[0][1].approximate = 'tanh'
    x, identity = torch.randn(2, 5, 7, 96), torch.randn(2, 5, 7, 96)
    reference = copy.deepcopy(block).double()
    xd, idd = x.double().requires_grad_(), identity.double().requires_grad_()
    torch.manual_seed(1)
    expected = reference.ffn(xd, idd)
    if change == 'eval_no_grad':
        block.eval()
        with torch.no_grad():
            out = block._ffn(x, identity)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        assert compiled_ops.ran() == set()
        return
    x.requires_grad_(), identity.requires_grad_()
    torch.manual_seed(1)
    out = block._ffn(x, identity)
    assert compiled_ops.ran() == ({'gelu_with_derivative_'} if change is None else set())
    if change == 'ffn_drop':  # dropped hidden values: the outputs differ from the FFN's
        assert not torch.allclose(out.double(), reference.ffn.eval()(xd, idd), atol=1e-3)
        return
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(identity.grad.double(), idd.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(block.ffn.named_parameters(), reference.ffn.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-5, atol=1e-4, msg=name)


def test_linear_in_inference_is_onednns(monkeypatch):
    """`linear` (the D-DW kernel predictor's products) equals F.linear, and is oneDNN's
    linear layer on CPU without autograd in float32 and under bfloat16 autocast; with
    autograd, and in float64, it is F.linear."""
    from mmdwnet.models.utils.fused_layers import linear
    torch.manual_seed(0)
    x, weight, bias = torch.randn(16, 24), torch.randn(4704, 24), torch.randn(4704)
    weight.requires_grad_()
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(*args):
        calls.append(args[0].dtype)
        return real(*args)

    monkeypatch.setattr(torch.ops.mkldnn, '_linear_pointwise', spy, raising=False)
    expected = F.linear(x, weight, bias)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, weight, bias), expected, rtol=1e-6, atol=1e-5)
        assert linear(x, weight).shape == (16, 4704)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = linear(x, weight, bias)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), expected, rtol=0.02, atol=0.1)
        # bfloat16 where this CPU has oneDNN kernels for it (not on AVX2-only CPUs)
        from mmdwnet.models.utils.fused_layers import onednn_dtypes
        assert calls == [torch.float32, torch.float32] + [
            torch.bfloat16 for _ in range(torch.bfloat16 in onednn_dtypes())]
        torch.testing.assert_close(linear(x.double(), weight.double(), bias.double()),
                                   expected.double(), rtol=1e-6, atol=1e-5)
    n = len(calls)
    out = linear(x, weight, bias)
    assert out.requires_grad and len(calls) == n
    out.sum().backward()
    torch.testing.assert_close(weight.grad, x.sum(0).expand(4704, 24))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_onednn_dtypes_are_those_its_kernels_take_here(dtype):
    """The fused layers use oneDNN only in the dtypes it has kernels for on this CPU: a
    dtype is listed exactly where oneDNN's linear layer computes in it."""
    from mmdwnet.models.utils.fused_layers import onednn_dtypes
    x, weight = torch.randn(8, 16).to(dtype), torch.randn(4, 16).to(dtype)
    try:
        out = torch.ops.mkldnn._linear_pointwise(x, weight, None, 'none', [], '')
        runs = out.dtype == dtype
    except RuntimeError:
        runs = False
    assert (dtype in onednn_dtypes()) == runs
