"""Synthesised checkpoints in the layout of the authors' code (from the key manifest) are
converted and compared with an independent re-implementation of the reference forward."""
import json
import math
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, assert_demo_matches_in_process, reporting_config, run_tool
from mmengine.config import Config
from PIL import Image

from mmdwnet.converters import ConversionError, check_fits, convert_official
from mmdwnet.utils import build_model, imagenet_classifier_cfg

# parameter names and shapes of the reference models (shared/reference/, kept with the tests)
MANIFEST = osp.join(ROOT, 'tests', 'data', 'official_dwnet_keys.json')
VARIANTS = {  # manifest name -> (arch, conv_type)
    'dwnet_tiny': ('tiny', 'dw'), 'ddwnet_tiny': ('tiny', 'ddw'),
    'iddwnet_tiny': ('tiny', 'iddw'), 'dwnet_base': ('base', 'dw'),
    'ddwnet_base': ('base', 'ddw'), 'iddwnet_base': ('base', 'iddw'),
}


def _manifest():
    with open(MANIFEST) as f:
        return json.load(f)['models']


def synthesise(shapes, seed=0):
    """Random values in the reference layout; BatchNorm statistics of realistic size."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith('num_batches_tracked'):
            state[key] = torch.tensor(100)
        elif key.endswith('running_var'):
            state[key] = torch.rand(shape, generator=gen) * 0.5 + 0.5
        elif key.endswith('running_mean'):
            state[key] = torch.randn(shape, generator=gen) * 0.1
        elif len(shape) == 1 and key.endswith('weight'):  # norm scales
            # residual branches end small, as in trained deep networks
            scale = 0.2 if key.endswith('attn2conv.bn2.weight') else 1.
            state[key] = scale * (1 + 0.1 * torch.randn(shape, generator=gen))
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            # predicted kernels stay small, as in trained models (they sum K*K taps)
            scale = 0.05 if '.conv.conv2' in key else 0.2 if 'mlp.fc2' in key else 1.
            state[key] = torch.randn(shape, generator=gen) * scale / math.sqrt(fan_in)
    return state


# ---------------------------------------------- the reference forward, written out ---
def _bn(sd, p, x):
    return F.batch_norm(x, sd[p + 'running_mean'], sd[p + 'running_var'], sd[p + 'weight'],
                        sd[p + 'bias'], False, 0., 1e-5)


def _spatial(sd, p, t, conv_type, groups=32, k=7):
    b, c, h, w = t.shape
    if conv_type == 'dw':
        return F.conv2d(t, sd[p + 'conv.weight'], sd[p + 'conv.bias'], padding=k // 2,
                        groups=c)
    if conv_type == 'ddw':
        kernels = F.conv2d(t.mean((2, 3), keepdim=True), sd[p + 'conv.conv1.weight'])
        kernels = F.conv2d(F.relu(_bn(sd, p + 'conv.bn.', kernels)),
                           sd[p + 'conv.conv2.weight'], sd[p + 'conv.conv2.bias'])
        out = F.conv2d(t.reshape(1, b * c, h, w), kernels.reshape(b * c, 1, k, k),
                       padding=k // 2, groups=b * c)
        return out.reshape(b, c, h, w) + sd[p + 'conv.bias'].view(1, c, 1, 1)
    weight = F.conv2d(t, sd[p + 'conv.conv1.0.weight'], sd[p + 'conv.conv1.0.bias'])
    weight = F.conv2d(F.relu(_bn(sd, p + 'conv.conv1.1.', weight)),
                      sd[p + 'conv.conv2.0.weight'], sd[p + 'conv.conv2.0.bias'])
    cols = F.unfold(t, k, padding=k // 2).view(b, groups, c // groups, k * k, h, w)
    return (cols * weight.view(b, groups, 1, k * k, h, w)).sum(3).view(b, c, h, w)


def reference_forward(sd, x, conv_type, depths):
    x = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=4)
    b, c, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)  # (B, L, C) as in Swin
    x = F.layer_norm(x, (c, ), sd['patch_embed.norm.weight'], sd['patch_embed.norm.bias'])
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f'layers.{i}.blocks.{j}.'
            t = x.transpose(1, 2).reshape(b, c, h, w)
            t = F.relu(_bn(sd, p + 'attn2conv.bn0.', F.conv2d(t, sd[p + 'attn2conv.conv0.weight'])))
            t = F.relu(_bn(sd, p + 'attn2conv.bn.', _spatial(sd, p + 'attn2conv.', t, conv_type)))
            t = _bn(sd, p + 'attn2conv.bn2.', F.conv2d(t, sd[p + 'attn2conv.conv2.weight']))
            x = x + t.flatten(2).transpose(1, 2)
            y = _bn(sd, p + 'bn.', x.transpose(1, 2)).transpose(1, 2)
            y = F.gelu(F.linear(y, sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias']))
            x = x + F.linear(y, sd[p + 'mlp.fc2.weight'], sd[p + 'mlp.fc2.bias'])
        if i < len(depths) - 1:
            p = f'layers.{i}.downsample.'
            v = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
            v = torch.cat([v[:, 0::2, 0::2], v[:, 1::2, 0::2], v[:, 0::2, 1::2],
                           v[:, 1::2, 1::2]], -1)  # positions (0,0) (1,0) (0,1) (1,1)
            h, w = v.shape[1:3]
            v = F.layer_norm(v.view(b, h * w, 4 * c), (4 * c, ), sd[p + 'norm.weight'],
                             sd[p + 'norm.bias'])
            x, c = F.linear(v, sd[p + 'reduction.weight']), 2 * c
    x = F.layer_norm(x, (c, ), sd['norm.weight'], sd['norm.bias']).mean(1)
    return F.linear(x, sd['head.weight'], sd['head.bias'])


@pytest.mark.parametrize('name', list(VARIANTS))
def test_converted_classifier_matches_reference(name):
    entry = _manifest()[name]
    arch, conv_type = VARIANTS[name]
    official = synthesise(entry['state_dict'])
    state, info = convert_official({'model': official})
    assert info == dict(kind='cls', arch=arch, conv_type=conv_type)
    model = build_model(imagenet_classifier_cfg(arch, conv_type))
    check_fits(state, model)
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    assert sum(p.numel() for p in model.parameters()) == entry['params']
    depths = [2, 2, 6, 2] if arch == 'tiny' else [2, 2, 18, 2]
    x = torch.randn(2, 3, 72, 100, generator=torch.Generator().manual_seed(1))  # odd maps
    with torch.no_grad():
        ours = model(x, mode='tensor')
        theirs = reference_forward(official, x, conv_type, depths)
    assert (ours - theirs).abs().max() < 1e-4


def test_patch_merging_order_is_not_the_identity():
    # the channel reordering matters: unconverted merging weights give other outputs
    from mmdwnet.converters import merging_to_unfold_order
    w = torch.arange(8.).view(1, 8)  # C = 2: blocks (0,0) (1,0) (0,1) (1,1)
    # unfold order c*4 + 2r + s: c0:(0,0),(0,1),(1,0),(1,1) then c1
    assert merging_to_unfold_order(w, 2).tolist() == [[0., 4., 2., 6., 1., 5., 3., 7.]]


@pytest.mark.slow
@pytest.mark.parametrize('kind,config', [
    ('det', 'mmdet/cascade_iddwconv_t_3x.py'),
    ('seg', 'mmseg/upernet_ddwconv_t_512x512_160k_ade20k.py'),
])
def test_dense_checkpoints_convert(kind, config, tmp_path):
    """A dense checkpoint in the reference layout: backbone in the classifier layout with
    `backbone.` and norm0..norm3 (SyncBN), the heads as in mmdet 2.x / mmseg 0.x. Converted
    with the tool, it loads strictly and runs through tools/demo.py (the task inferencer)."""
    cfg = Config.fromfile(osp.join(ROOT, 'configs', config))
    model = build_model(cfg)
    conv_type = cfg.model.backbone.conv_type
    shapes = _manifest()[f'{conv_type}net_tiny']['state_dict']
    official = {f'backbone.{k}': v for k, v in synthesise(shapes).items()
                if not k.startswith(('norm.', 'head.'))}
    for i, c in enumerate([96, 192, 384, 768]):
        for name, value in (('weight', torch.ones(c)), ('bias', torch.zeros(c)),
                            ('running_mean', torch.zeros(c)), ('running_var', torch.ones(c)),
                            ('num_batches_tracked', torch.tensor(0))):
            official[f'backbone.norm{i}.{name}'] = value
    official.update({k: v for k, v in model.state_dict().items()
                     if not k.startswith('backbone.')})
    state, info = convert_official({'state_dict': official, 'meta': {}})
    assert info == dict(kind=kind, arch='tiny', conv_type=conv_type)
    check_fits(state, model)
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected

    src, dst = tmp_path / 'official.pth', tmp_path / 'converted.pth'
    torch.save({'state_dict': official, 'meta': {}}, src)
    run_tool('model_converters/official_to_mmdwnet.py', str(src), str(dst))
    converted = torch.load(dst, weights_only=True)['state_dict']
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)

    image = tmp_path / 'image.jpg'
    pixels = torch.randint(0, 256, (240, 320, 3), generator=torch.Generator().manual_seed(0))
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(image)
    out = tmp_path / 'prediction.png'
    pred = tmp_path / 'prediction.json'
    run_config = reporting_config(osp.join(ROOT, 'configs', config), tmp_path)
    result = run_tool('demo.py', str(image), run_config, str(dst), '--out', str(out),
                      '--score-thr', '0.0', '--pred-out', str(pred))
    assert 'Traceback' not in result.stderr
    assert np.asarray(Image.open(out)).shape == (240, 320, 3)
    summary = '20 objects scoring at least 0.0' if kind == 'det' else 'classes in the map'
    assert summary in result.stdout and f'saved {pred}' in result.stdout
    # the demo's prediction is the converted model's: an in-process forward agrees
    assert_demo_matches_in_process(run_config, str(dst), str(image), str(pred))


def test_refuses_other_files():
    with pytest.raises(ConversionError, match='neither `model`'):
        convert_official({'weights': {}})
    with pytest.raises(ConversionError, match=r'no DWNet stem patch_embed.proj.weight'):
        convert_official({'model': {'conv1.weight': torch.zeros(64, 3, 7, 7)}})
    with pytest.raises(ConversionError, match='stem width 64 is neither 96'):
        convert_official({'model': {'patch_embed.proj.weight': torch.zeros(64, 3, 4, 4)}})
    shapes = _manifest()['dwnet_tiny']['state_dict']
    official = synthesise(shapes)
    official['layers.0.blocks.0.mlp.fc1.weight'] = torch.zeros(10, 96)  # wrong shape
    state, _ = convert_official({'model': official})
    with pytest.raises(ConversionError, match='1 differently shaped'):
        check_fits(state, build_model(imagenet_classifier_cfg('tiny', 'dw')))


@pytest.mark.slow
def test_converter_tool(tmp_path):
    shapes = _manifest()['ddwnet_tiny']['state_dict']
    torch.save({'model': synthesise(shapes)}, tmp_path / 'dynamic_dwnet_tiny_224.pth')
    tool = 'model_converters/official_to_mmdwnet.py'
    result = run_tool(tool, str(tmp_path / 'dynamic_dwnet_tiny_224.pth'),
                      str(tmp_path / 'out.pth'))
    assert 'converted cls checkpoint, tiny ddw: 437 tensors' in result.stdout
    converted = torch.load(tmp_path / 'out.pth', weights_only=True)
    assert converted['meta']['config'] == 'mmpretrain/ddwconv_t_8xb128_in1k.py'
    # not a DWNet checkpoint: refused, nothing written
    torch.save({'model': {'fc.weight': torch.zeros(2, 2)}}, tmp_path / 'other.pth')
    result = run_tool(tool, str(tmp_path / 'other.pth'), str(tmp_path / 'never.pth'),
                      check=False)
    assert result.returncode == 1 and 'is not a checkpoint this converter knows' in result.stderr
    assert not (tmp_path / 'never.pth').exists()
