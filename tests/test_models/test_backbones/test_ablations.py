"""The paper's ablation variants: build, parameter counts against the paper, the modules
they add, forward/backward; the centering-calibrated BatchNorm against its formula."""
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT
from mmengine.config import Config

from mmdwnet.models import DWNet
from mmdwnet.models.utils import CenteringCalibratedBN, ChannelSharedDWConv, is_foldable
from mmdwnet.utils import build_model
from mmdwnet.utils.model_zoo import load_models

# config -> (exact parameters of the classifier built here, paper's rounded figure or None)
ABLATIONS = {
    'dwconv_t_se_8xb128_in1k': (24_450_856, 24e6),
    'dwconv_t_ln_8xb128_in1k': (24_172_744, None),
    'dwconv_t_ccbn_8xb128_in1k': (24_190_408, None),
    'iddwconv_t_dw_8xb128_in1k': (26_473_912, 27e6),
    'dwconv_t_sc_8xb128_in1k': (23_963_122, 23.9e6),
    'dwconv_t_384px_ft': (24_172_744, 24e6),
    'dwconv_t_k12_384px_ft': (24_592_264, 25e6),
    'localmlp_t_8xb128_in1k': (26_132_824, 26e6),
    'localmlp_t_sw_8xb128_in1k': (24_274_450, 24.3e6),
    'localmlp_b_8xb128_in1k': (78_485_032, 79e6),
}


def _build(name):
    return build_model(
        Config.fromfile(osp.join(ROOT, 'configs', 'mmpretrain', 'ablations', f'{name}.py')))


@pytest.mark.parametrize('name', list(ABLATIONS))
def test_ablation_builds_counts_and_trains(name):
    model = _build(name)
    params = sum(p.numel() for p in model.parameters())
    exact, paper = ABLATIONS[name]
    assert params == exact
    # the model zoo's entry (what `mim search` and the README show) holds the same count
    entry, = (m for m in load_models() if m['Name'] == name)
    assert entry['Metadata']['Parameters'] == exact
    if paper is not None:
        assert abs(params - paper) <= 1e6
    # per-window Local MLP weights exist for the 224x224 windows only
    size = 224 if name.startswith('localmlp') else 64
    x = torch.randn(2, 3, size, size)
    logits = model(x, mode='tensor')
    assert logits.shape == (2, 1000)
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_ablation_modules():
    block = _build('dwconv_t_se_8xb128_in1k').backbone.stages[0].blocks[0]
    assert type(block.se).__name__ == 'SELayer' and block.se.conv1.conv.out_channels == 8
    block = _build('dwconv_t_ln_8xb128_in1k').backbone.stages[0].blocks[0]
    assert [type(m).__name__ for m in (block.norm1, block.norm2, block.norm3,
                                       block.ffn_norm)] == ['LayerNorm2d'] * 4
    block = _build('dwconv_t_ccbn_8xb128_in1k').backbone.stages[0].blocks[0]
    assert all(isinstance(m, CenteringCalibratedBN)
               for m in (block.norm1, block.norm2, block.norm3, block.ffn_norm))
    block = _build('iddwconv_t_dw_8xb128_in1k').backbone.stages[2].blocks[0]
    assert block.local_conv.weight.shape == (384, 1, 7, 7)
    backbone = _build('dwconv_t_sc_8xb128_in1k').backbone
    convs = [stage.blocks[0].dw_conv for stage in backbone.stages]
    assert all(isinstance(c, ChannelSharedDWConv) for c in convs)
    assert [c.weight.shape[0] for c in convs] == [3, 6, 12, 24]


def test_channel_shared_kernels_are_shared():
    conv = ChannelSharedDWConv(8, 3, groups=2)
    x = torch.zeros(1, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    x[:, :, 2, 2] = 1.  # an impulse: the output shows each channel's kernel
    y = conv(x) - conv.bias.view(1, -1, 1, 1)
    for c in range(8):
        torch.testing.assert_close(y[0, c, 1:4, 1:4], conv.weight[c // 4, 0].flip(0, 1))


def test_centering_calibrated_bn_formula_and_deploy():
    norm = CenteringCalibratedBN(6).eval()
    gen = torch.Generator().manual_seed(0)
    norm.centering_weight.data = torch.randn(6, generator=gen)
    norm.running_mean.copy_(torch.randn(6, generator=gen))
    norm.running_var.copy_(torch.rand(6, generator=gen) + 0.5)
    x = torch.randn(2, 6, 4, 5, generator=gen)
    calibrated = x + norm.centering_weight.view(1, -1, 1, 1) * x.mean((2, 3), keepdim=True)
    expected = F.batch_norm(calibrated, norm.running_mean, norm.running_var, norm.weight,
                            norm.bias, False, 0., norm.eps)
    torch.testing.assert_close(norm(x), expected)
    assert not is_foldable(norm)
    model = DWNet('tiny', 'dw', norm_cfg=dict(type='CCBN')).eval()
    for m in model.modules():
        if isinstance(m, CenteringCalibratedBN):
            m.centering_weight.data.uniform_(-1, 1)
    x = torch.randn(1, 3, 64, 64, generator=gen)
    with torch.no_grad():
        before = model(x)[0]
        model.switch_to_deploy()  # CCBN cannot be folded: it stays, outputs unchanged
        after = model(x)[0]
    assert isinstance(model.stages[0].blocks[0].norm1, CenteringCalibratedBN)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kwargs,pattern', [
    (dict(se_ratio=0), '`se_ratio` must be a positive int or None, got 0'),
    (dict(shared_kernel_groups=[3, 6, 12]), "`shared_kernel_groups` needs conv_type='dw'"),
    (dict(shared_kernel_groups=[5, 6, 12, 24]), 'dividing its channels'),
    (dict(conv_type='iddw', shared_kernel_groups=[3, 6, 12, 24]), "conv_type='iddw'"),
])
def test_bad_ablation_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DWNet('tiny', **{'conv_type': 'dw', **kwargs})


def test_local_mlp_window_weights():
    from mmdwnet.models.backbones.local_mlp import LocalMLP, WindowLocalMLP
    model = LocalMLP('tiny')
    msa = model.stages[0].blocks[1].attn.w_msa  # a shifted-window block
    assert isinstance(msa, WindowLocalMLP) and msa.mixing.shape == (64, 3, 49, 49)
    assert model.stages[3].blocks[0].attn.w_msa.mixing.shape == (1, 24, 49, 49)
    assert not any('qkv' in n or 'relative_position' in n for n, _ in model.named_parameters())
    # static weights: the output for one window is W @ v, independent of other windows
    torch.nn.init.normal_(msa.mixing)
    x = torch.randn(128, 49, 96)
    out = msa(x)
    v = msa.v(x).view(2, 64, 49, 3, 32)
    expected = torch.einsum('hij,bjhd->bihd', msa.mixing[5], v[:, 5]).reshape(2, 49, 96)
    torch.testing.assert_close(out.view(2, 64, 49, 96)[:, 5], msa.proj(expected))
    # per-window weights need the training resolution; shared ones take any size
    with pytest.raises(ValueError, match='share_windows=True'):
        model(torch.randn(1, 3, 128, 128))
    shared = LocalMLP('tiny', share_windows=True, pad_small_map=True, out_indices=(0, 1, 2, 3))
    assert [o.shape[1:] for o in shared(torch.randn(1, 3, 96, 160))] == [
        (96, 24, 40), (192, 12, 20), (384, 6, 10), (768, 3, 5)]
