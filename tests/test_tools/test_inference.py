"""tools/demo.py and the task libraries' inferencers with our configs and checkpoints."""
import os.path as osp

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_demo_matches_in_process, reporting_config, run_tool
from mmengine.config import Config
from PIL import Image

from mmdwnet.utils import build_model

pytestmark = pytest.mark.slow  # tools in subprocesses

# Detection and segmentation run through tools/demo.py on converted checkpoints, with the
# same comparison (tests/test_converters/test_official.py::test_dense_checkpoints_convert).
CASES = [
    ('mmpretrain/ddwconv_t_8xb128_in1k.py', 'imagenet/val/ILSVRC2012_val_00000001.JPEG', '5. '),
]


def _dataset_meta(scope):
    if scope == 'mmdet':
        from mmdet.datasets import CocoDataset
        return dict(CocoDataset.METAINFO)
    if scope == 'mmseg':
        from mmseg.datasets import ADE20KDataset
        return dict(ADE20KDataset.METAINFO)
    from mmpretrain.datasets import ImageNet
    return dict(ImageNet.METAINFO)


@pytest.mark.parametrize('config,image,expected', CASES, ids=lambda c: str(c)[:12])
def test_demo_tool_runs_the_inferencer(config, image, expected, data_root, tmp_path):
    cfg = Config.fromfile(osp.join(ROOT, 'configs', config))
    model = build_model(cfg)
    checkpoint = str(tmp_path / 'model.pth')
    torch.save({'state_dict': model.state_dict(),
                'meta': dict(dataset_meta=_dataset_meta(cfg.default_scope))}, checkpoint)
    out = tmp_path / 'prediction.png'
    image = osp.join(str(data_root), image)
    pred = str(tmp_path / 'prediction.json')
    run_config = reporting_config(osp.join(ROOT, 'configs', config), tmp_path)
    result = run_tool('demo.py', image, run_config, checkpoint, '--out', str(out),
                      '--score-thr', '0.0', '--pred-out', pred)
    assert_demo_matches_in_process(run_config, checkpoint, image, pred)
    assert expected in result.stdout
    if cfg.default_scope == 'mmpretrain':
        assert result.stdout.count('\n') >= 5 and not out.exists()
    else:
        picture = np.asarray(Image.open(out))
        assert picture.shape[:2] == np.asarray(Image.open(image)).shape[:2]
