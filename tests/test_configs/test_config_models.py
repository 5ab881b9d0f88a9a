import glob
import os

import pytest
from helpers import ROOT
from mmengine.config import Config

from mmdwnet.utils import build_model
from mmdwnet.utils.model_zoo import load_models

CONFIG_DIR = os.path.join(ROOT, 'configs')

# (task, model) -> parameters in millions: paper Table 3 (COCO, ADE20K; within 1M) and the
# exact ImageNet classifier counts (tests/data/official_dwnet_keys.json)
PAPER_PARAMS = {
    ('mmdet', 'dwconv_t'): 82, ('mmdet', 'ddwconv_t'): 108, ('mmdet', 'iddwconv_t'): 84,
    ('mmdet', 'dwconv_b'): 132, ('mmdet', 'ddwconv_b'): 219, ('mmdet', 'iddwconv_b'): 137,
    ('mmseg', 'dwconv_t'): 56, ('mmseg', 'ddwconv_t'): 83, ('mmseg', 'iddwconv_t'): 58,
    ('mmseg', 'dwconv_b'): 108, ('mmseg', 'ddwconv_b'): 195, ('mmseg', 'iddwconv_b'): 114,
}
IMAGENET_PARAMS = {
    'dwconv_t': 24_172_744, 'ddwconv_t': 51_131_752, 'iddwconv_t': 26_244_280,
    'dwconv_b': 74_347_112, 'ddwconv_b': 161_597_928, 'iddwconv_b': 80_253_608,
}
METAFILE_PARAMS = {m['Config']: m['Metadata']['Parameters']
                   for m in load_models()}
# DWNet configs (the Local MLP ablation's dense configs: test_localmlp_dense_config_parameters)
CONFIGS = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, 'mm*', '*.py'))
                 if 'localmlp' not in os.path.basename(p))


def _model_key(path):
    name = os.path.basename(path)
    for key in sorted(IMAGENET_PARAMS, key=len, reverse=True):
        if f'_{key}_' in f'_{name}'.replace('cascade_', '_').replace('upernet_', '_'):
            return key
    raise AssertionError(f'no model name in {name}')


def test_every_config_is_there():
    names = {os.path.relpath(p, CONFIG_DIR) for p in CONFIGS}
    for conv in ('dwconv', 'ddwconv', 'iddwconv'):
        for size in 't', 'b':
            assert f'mmdet/cascade_{conv}_{size}_3x.py' in names
            assert f'mmseg/upernet_{conv}_{size}_512x512_160k_ade20k.py' in names
            assert f'mmpretrain/{conv}_{size}_8xb128_in1k.py' in names
    assert len(names) == 18


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_model_parameters(path):
    cfg = Config.fromfile(path)
    task = os.path.basename(os.path.dirname(path))
    assert cfg.default_scope == task
    assert cfg.custom_imports == dict(imports=['mmdwnet'], allow_failed_imports=False)
    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    key = _model_key(path)
    backbone = cfg.model.backbone
    assert backbone.type == 'DWNet'
    assert backbone.arch == {'t': 'tiny', 'b': 'base'}[key[-1]]
    assert backbone.conv_type == key.split('conv')[0]
    if task == 'mmpretrain':
        assert params == IMAGENET_PARAMS[key]
    else:
        assert abs(params / 1e6 - PAPER_PARAMS[(task, key)]) < 1.0, params
    # the model zoo's metafile records this exact count
    assert METAFILE_PARAMS[os.path.relpath(path, os.path.dirname(CONFIG_DIR))] == params
    if task != 'mmpretrain':
        assert backbone.out_indices == (0, 1, 2, 3)
        assert backbone.init_cfg == dict(type='Pretrained',
                                         checkpoint=f'checkpoints/{key}_in1k.pth',
                                         prefix='backbone.')
        assert backbone.out_norm_cfg['type'] == 'SyncBN'


LOCALMLP_DENSE = sorted(glob.glob(os.path.join(CONFIG_DIR, 'mm*', '*localmlp*.py')))


@pytest.mark.parametrize('path', LOCALMLP_DENSE, ids=lambda p: os.path.basename(p))
def test_localmlp_dense_config_parameters(path):
    """The Local MLP-T detection and segmentation configs (shared window weights, so any
    input size) build with the exact parameter count of the models built here, which the
    metafile records."""
    assert len(LOCALMLP_DENSE) == 2
    cfg = Config.fromfile(path)
    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    backbone = model.backbone
    assert type(backbone).__name__ == 'LocalMLP' and backbone.share_windows
    assert cfg.model.backbone.arch == 'tiny'
    assert params == {'mmdet': 81_615_900, 'mmseg': 55_927_958}[cfg.default_scope]
    assert METAFILE_PARAMS[os.path.relpath(path, os.path.dirname(CONFIG_DIR))] == params
