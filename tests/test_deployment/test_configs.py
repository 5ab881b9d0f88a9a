"""Every tiny and base DWNet classifier (the base ones with a shortened stage 3), and the
tiny UPerNet and Cascade Mask R-CNN models (backbone + neck), leave PyTorch: ONNX in standard
operations with dynamic batch, height and width, run by ONNX Runtime at two sizes (one odd)
within 1e-4 of eager PyTorch relative to the output scale; torch.export programs save, load
back and agree; torch.compile runs the backbones in train and eval mode with no graph
break, gradients included."""
import copy

import onnx
import pytest
import torch
from helpers import ROOT
from mmengine.config import Config

from mmdwnet.apis.export import export_prepared, export_program, prepare_for_export
from mmdwnet.models import DWNet
from mmdwnet.utils import build_model, config_task

OPS = ('dwconv', 'ddwconv', 'iddwconv')
CLASSIFIERS = [f'mmpretrain/{op}_{size}_8xb128_in1k.py' for size in 'tb' for op in OPS]
SEGMENTORS = [f'mmseg/upernet_{op}_t_512x512_160k_ade20k.py' for op in OPS]
DETECTORS = [f'mmdet/cascade_{op}_t_3x.py' for op in OPS]
SMALL = dict(embed_dims=16, depths=[1, 1, 2, 1], group_channels=[4, 8, 16, 32])
TOLERANCE = 1e-4  # of the output's largest magnitude


def _randomise_bn_statistics(model, seed=0):
    """Running statistics away from (0, 1), so that folding them is tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


def _prepared(config):
    cfg = Config.fromfile(f'{ROOT}/configs/{config}')
    if cfg.model.backbone.arch == 'base':
        # base widths with 2 blocks in stage 3 instead of 18: the blocks left are the
        # base's own operations at its widths, and the 16 more only repeat them (the
        # exporter's graph passes took ~50 s per dynamic base classifier on 2 cores)
        cfg.model.backbone.arch = dict(DWNet.arch_zoo['base'], depths=[2, 2, 2, 2])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    _randomise_bn_statistics(model)
    lines = []
    task = config_task(cfg)
    return prepare_for_export(model, task, progress=lines.append), task, lines


@pytest.mark.parametrize('config', CLASSIFIERS + SEGMENTORS + DETECTORS)
def test_onnx_runtime_matches_pytorch(config, tmp_path):
    model, task, lines = _prepared(config)
    out = tmp_path / 'model.onnx'
    # traced at batch 2, 64x64; verified there and at batch 3, 71x59
    result = export_prepared(model, task, 'onnx', str(out), shape=(64, 64), dynamic=True,
                             verify=True, progress=lines.append)
    assert result['max_rel_diff'] < TOLERANCE, result
    assert 'verified on 2 input(s)' in ''.join(lines)
    ops = {(n.domain or 'ai.onnx', n.op_type) for n in onnx.load(str(out)).graph.node}
    assert {domain for domain, _ in ops} == {'ai.onnx'}
    assert not {op for _, op in ops} & {'Unfold', 'Im2Col', 'Col2Im'}
    if task == 'mmseg':  # the pyramid pooling's four adaptive poolings, three exported
        assert 'decode_head.psp_modules.3.0' in ''.join(lines)


@pytest.mark.parametrize('op', OPS)
def test_classifier_torch_export(op):
    """The tiny classifiers through torch.export with dynamic batch, height and width, run
    at other sizes; the fast operators stay whole (registered custom operators)."""
    model, _, _ = _prepared(f'mmpretrain/{op}_t_8xb128_in1k.py')
    program = export_program(model, torch.randn(2, 3, 64, 64), dynamic=True)
    targets = {str(n.target) for n in program.graph.nodes if n.op == 'call_function'}
    custom = {'dwconv': set(), 'ddwconv': {'mmdwnet.depthwise_conv2d.default'},
              'iddwconv': {'mmdwnet.predicted_idwconv2d.default'}}[op]
    assert custom <= targets
    for shape in [(1, 3, 97, 131), (3, 3, 64, 64)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected, got = model(x), program.module()(x)
        torch.testing.assert_close(got, expected, atol=TOLERANCE * expected.abs().max(), rtol=0)


@pytest.mark.parametrize('conv_type', ['dw', 'ddw', 'iddw'])
def test_backbone_exported_program_round_trip(conv_type, tmp_path):
    """A DWNet backbone (all four outputs) through tools/deployment/export.py's
    exported-program path: torch.export with dynamic sizes, torch.export.save, loaded
    back (torch.export.load) and the same outputs at two sizes, one odd."""
    torch.manual_seed(0)
    model = DWNet(SMALL, conv_type, out_indices=(0, 1, 2, 3))
    model.init_weights()
    _randomise_bn_statistics(model)
    model.eval().switch_to_deploy()
    out = tmp_path / 'backbone.pt2'
    result = export_prepared(model, 'mmpretrain', 'exported-program', str(out), (64, 64),
                             dynamic=True, verify=True, progress=lambda line: None)
    # verified on the loaded program: batch 2 at 64x64 and batch 3 at 71x59
    assert result['max_rel_diff'] < TOLERANCE, result
    assert sorted(p.name for p in tmp_path.iterdir()) == ['backbone.pt2']


@pytest.mark.parametrize('conv_type', ['dw', 'ddw', 'iddw'])
def test_torch_compile_fullgraph_train_and_eval(conv_type):
    """fullgraph=True fails on any graph break. The aot_eager backend runs dynamo and AOT
    autograd (fake kernels, registered autograd, layouts) without generating C++, which
    would cost minutes here; tools/benchmark.py --compile uses inductor.

    Compiled, the FFN is the standard composition of linear layers and GELU that
    ``gelu_mlp`` falls back to; the eager reference computes the same (its fused CPU
    training form rounds differently, and a tiny D-DW model in training mode amplifies
    that to about 2e-4 of the largest output; test_gelu_mlp.py checks that form against
    float64)."""
    from mmdwnet.ops import cpu_extension, use_backend
    cpu_extension.load()
    # the eager reference's FFN as the standard composition too
    with use_backend('pytorch', ops=['gelu_mlp']):
        torch.manual_seed(0)
        model = DWNet(SMALL, conv_type, out_indices=(0, 1, 2, 3))
        model.init_weights()
        eager = copy.deepcopy(model)
        compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
        x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
        for mode in ('train', 'eval'):
            model.train(mode == 'train')
            eager.train(mode == 'train')
            got, expected = compiled(x), eager(x)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, atol=1e-5 * e.abs().max().item(), rtol=0)
            if mode == 'train':
                sum(o.square().mean() for o in got).backward()
                sum(o.square().mean() for o in expected).backward()
                grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), eager.parameters())]
                scale = max(q.abs().max().item() for _, q in grads)
                for p, q in grads:  # relative to the largest gradient: some are ~1e-12
                    torch.testing.assert_close(p, q, atol=1e-5 * scale, rtol=0)
