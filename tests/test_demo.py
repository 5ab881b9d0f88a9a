"""The quickstart demo's summaries (demo/quickstart.py): the variants built through every
task library's registry, with their parameters and output shapes."""
import importlib.util
import os.path as osp

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _quickstart():
    spec = importlib.util.spec_from_file_location('quickstart',
                                                  osp.join(ROOT, 'demo', 'quickstart.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_summaries_build_through_every_registry():
    demo = _quickstart()
    messages = []
    rows = demo.summarize_backbones(archs=('tiny', ), conv_types=('iddw', ),
                                    input_size=(65, 97), progress=messages.append)
    assert [r['scope'] for r in rows] == ['mmpretrain', 'mmdet', 'mmseg']
    assert {r['params'] for r in rows} == {25_476_624}
    assert all(r['shapes'] == [(96, 17, 25), (192, 9, 13), (384, 5, 7), (768, 3, 4)]
               for r in rows)
    assert messages[0] == 'building the tiny iddw DWNet with mmpretrain.registry.MODELS'
    cls, = demo.summarize_classifiers(archs=('tiny', ), conv_types=('dw', ),
                                      input_size=(64, 64))
    assert cls['params'] == 24_172_744 and cls['shapes'] == [(1000, )]
    table = demo.format_table(rows).splitlines()
    assert table[2] == ('| mmpretrain | I-D-DW-T | 25,476,624 | '
                        '96x17x25 192x9x13 384x5x7 768x3x4 |')
