"""The model zoo's metafiles: complete, consistent with the models built here, with the
converter and with the paper; readable by mim; the README rendered from them. (Every
config's parameter count is checked against its metafile entry in
tests/test_configs/test_config_models.py, where the models are built anyway.)"""
import glob
import os.path as osp
import re
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, run_tool
from mmengine.config import Config

from analysis_tools.markdown import replace_section
from analysis_tools.model_zoo_tables import (ABLATIONS_MARKERS, MODEL_ZOO_MARKERS,
                                             render_ablations, render_model_zoo)
from mmdwnet.converters.official import target_config
from mmdwnet.utils.complexity import model_complexity
from mmdwnet.utils.model_zoo import input_size, load_models, update_complexity

MODELS = load_models()
BY_NAME = {m['Name']: m for m in MODELS}
# GMACs of the reference code's own counter at 224x224 (tests/data/official_dwnet_keys.json)
REFERENCE_GMACS = {
    'dwconv_t_8xb128_in1k': 3.742, 'ddwconv_t_8xb128_in1k': 3.771,
    'iddwconv_t_8xb128_in1k': 4.389, 'dwconv_b_8xb128_in1k': 12.845,
    'ddwconv_b_8xb128_in1k': 12.935, 'iddwconv_b_8xb128_in1k': 14.372,
}


def _size(text):
    """'82M' -> 82e6, '3.8G' -> 3.8e9."""
    return float(text[:-1]) * {'M': 1e6, 'G': 1e9}[text[-1]]


def test_every_config_has_one_entry():
    tasks = ('mmdet', 'mmseg', 'mmpretrain', 'mmpretrain/ablations')
    configs = sorted(osp.relpath(p, ROOT) for task in tasks
                     for p in glob.glob(osp.join(ROOT, 'configs', task, '*.py')))
    assert sorted(m['Config'] for m in MODELS) == configs
    assert len(BY_NAME) == len(MODELS) == 18 + 12
    for m in MODELS:
        assert m['Name'] == osp.splitext(osp.basename(m['Config']))[0]
        # every entry has the paper's metrics, except the Local MLP detection and
        # segmentation configs, for which the paper reports none
        assert all(r['Metrics'] for r in m['Results'])
        assert bool(m['Results']) != ('localmlp' in m['Name'] and 'in1k' not in m['Name'])


def test_model_index_loads_with_modelindex():
    from modelindex.load_model_index import load
    index = load(osp.join(ROOT, 'model-index.yml'))
    assert sorted(m.name for m in index.models) == sorted(BY_NAME)
    assert {c.name for c in index.collections} == {
        'DWNet', 'Cascade Mask R-CNN DWNet', 'UPerNet DWNet', 'DWNet Ablations'}


@pytest.mark.slow
def test_mim_search_lists_every_config():
    mim = osp.join(osp.dirname(sys.executable), 'mim')  # this environment's, not PATH's
    result = subprocess.run([mim, 'search', 'mmdwnet', '--valid-config'],
                            capture_output=True, text=True, cwd='/')
    assert result.returncode == 0, result.stderr[-2000:]
    for name in BY_NAME:
        assert f"'{name}'" in result.stdout
    result = subprocess.run([mim, 'search', 'mmdwnet', '--dataset', 'coco', '--field',
                             'parameters', 'flops', 'coco/box_ap'],
                            capture_output=True, text=True, cwd='/')
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'cascade_iddwconv_b_3x' in result.stdout and '51.8' in result.stdout
    assert 'upernet_' not in result.stdout


# Recounted here: every ImageNet entry (the six classifiers and all ten ablations, 224 and
# 384) and one dense config per task. The other 12 COCO/ADE20K entries (about 13 s each
# to count) are counted by `tools/model_zoo.py measure` only; their parameters are checked
# against the metafiles in tests/test_configs/test_config_models.py.
RECOUNTED = sorted(m['Name'] for m in MODELS if m['Config'].startswith('configs/mmpretrain/')
                   ) + ['cascade_dwconv_t_3x', 'upernet_dwconv_t_512x512_160k_ade20k']
_DENSE = {'cascade_dwconv_t_3x', 'upernet_dwconv_t_512x512_160k_ade20k'}


def test_recounted_entries():
    assert len(RECOUNTED) == 6 + 10 + 2 and set(REFERENCE_GMACS) <= set(RECOUNTED)


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=pytest.mark.slow) if n in _DENSE else n for n in RECOUNTED])
def test_flops_are_counted(name):
    """FLOPs recounted equal the metafile's; classifiers within 3% of the reference code's
    counter (the I-D-DW operator is counted by mmdwnet's rule, invisible to mmengine's)."""
    meta = BY_NAME[name]['Metadata']
    row = model_complexity(Config.fromfile(osp.join(ROOT, BY_NAME[name]['Config'])),
                           input_size(BY_NAME[name]))
    assert row['flops'] == meta['FLOPs'] and row['params'] == meta['Parameters']
    if name in REFERENCE_GMACS:
        assert abs(row['flops'] / 1e9 / REFERENCE_GMACS[name] - 1) < 0.03


def test_numbers_agree_with_the_paper():
    """Counted parameters within 1M and FLOPs within 3% of the paper's rounded figures
    (where the paper gives them: every main model, some ablations)."""
    for m in MODELS:
        meta = m['Metadata']
        if 'Paper Parameters' in meta:
            assert abs(meta['Parameters'] - _size(meta['Paper Parameters'])) <= 1e6, m['Name']
        if 'Paper FLOPs' in meta:
            assert abs(meta['FLOPs'] / _size(meta['Paper FLOPs']) - 1) < 0.03, m['Name']
    assert sum('Paper Parameters' in m['Metadata'] for m in MODELS) == 18 + 8


def test_authors_checkpoints_match_the_converter():
    """Every released checkpoint is attached to the config the converter targets for it;
    no I-D-DW weights were released."""
    released = {}
    for m in MODELS:
        source = m.get('Converted From')
        if source is None:
            continue
        name = osp.basename(source['Weights'])
        assert source['Weights'].startswith(
            'https://github.com/Atten4Vis/DemystifyLocalViT/releases/download/prerelease/')
        kind = ('det' if name.startswith('cascade_mask_rcnn_') else
                'seg' if name.startswith('upernet_') else 'cls')
        conv_type = 'ddw' if 'dynamic_dwnet' in name else 'dw'
        arch = 'tiny' if '_tiny' in name else 'base'
        assert 'configs/' + target_config(kind, arch, conv_type) == m['Config']
        released[name] = m['Name']
    assert len(released) == 12
    assert not any('iddw' in n for n in released.values())


@pytest.mark.slow
def test_pages_are_rendered_from_the_metafiles(tmp_path):
    """The README's model zoo and docs/ablations.md are the metafiles rendered; the tool's
    --check fails on a stale page and rewrites it otherwise."""
    body, ablations = render_model_zoo(MODELS), render_ablations(MODELS)
    assert not replace_section(osp.join(ROOT, 'README.md'), body, *MODEL_ZOO_MARKERS,
                               check=True), 'run: python tools/model_zoo.py readme'
    assert not replace_section(osp.join(ROOT, 'docs', 'ablations.md'), ablations,
                               *ABLATIONS_MARKERS, check=True)
    assert '| I-D-DW-B | 80,253,608 | 14.37G | 80M / 14.3G | 244.9 | 83.4 | - |' in body
    assert '[config](configs/mmpretrain/iddwconv_b_8xb128_in1k.py)' in body
    assert 'ablations/' not in body  # the ablations have their own page
    assert '| Table 6 | I-D-DW-T + DW |' in ablations
    # links from docs/ reach the configs
    assert '[config](../configs/mmpretrain/ablations/' in ablations
    for link in re.findall(r'\[config\]\(([^)]+)\)', ablations):
        assert osp.isfile(osp.join(ROOT, 'docs', link)), link
    (start, end), (astart, aend) = MODEL_ZOO_MARKERS, ABLATIONS_MARKERS
    readme, doc = tmp_path / 'README.md', tmp_path / 'ablations.md'
    readme.write_text(f'# x\n{start}\nold table\n{end}\n')
    doc.write_text(f'# y\n{astart}\nold\n{aend}\nrest\n')
    pages = ['readme', '--readme', str(readme), '--ablations-doc', str(doc)]
    result = run_tool('model_zoo.py', *pages, '--check', check=False)
    assert result.returncode == 1 and f'{readme} is out of date' in result.stderr
    run_tool('model_zoo.py', *pages)
    assert readme.read_text() == f'# x\n{start}\n{body}\n{end}\n'
    assert doc.read_text() == f'# y\n{astart}\n{ablations}\n{aend}\nrest\n'


def test_measure_rewrites_only_changed_numbers(tmp_path):
    """``tools/model_zoo.py measure``: recounts, writes back only what changed, and refuses
    unknown names before counting anything."""
    shutil.copytree(osp.join(ROOT, 'configs', 'mmpretrain'), tmp_path / 'mmpretrain')
    rel = 'mmpretrain/metafile.yml'
    path = tmp_path / rel
    original = path.read_text()
    name = 'dwconv_t_8xb128_in1k'
    assert update_complexity(str(tmp_path), [rel], [name]) == []  # numbers are current
    assert path.read_text() == original
    path.write_text(original.replace('Parameters: 24172744', 'Parameters: 1'))
    assert update_complexity(str(tmp_path), [rel], [name]) == [name]
    assert path.read_text() == original
    counted = []
    with pytest.raises(ValueError, match=r"no metafile entry named \['dwconv_t'\]"):
        update_complexity(str(tmp_path), [rel], ['dwconv_t', name], progress=counted.append)
    assert counted == []
