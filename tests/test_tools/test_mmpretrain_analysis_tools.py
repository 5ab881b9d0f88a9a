"""MMPretrain's analysis tools on mmdwnet's configs: vis_cam.py (Grad-CAM, target layer the
last block of the last stage) for the three variants, get_flops.py and browse_dataset.py."""
import os.path as osp
import runpy
import sys

import cv2
import mmpretrain
import numpy as np
import pytest
import torch
from helpers import ROOT
from mmengine.config import Config

from mmdwnet.testing import natural_images
from mmdwnet.utils import build_model

TOOLS = osp.join(osp.dirname(mmpretrain.__file__), '.mim', 'tools')
TARGET_LAYER = 'backbone.stages.3.blocks.1'  # the last block (tiny and base alike)


def _run(tool, argv, monkeypatch):
    """An mmpretrain tool run in this process (its imports are paid once)."""
    monkeypatch.setattr(sys, 'argv', [tool, *argv])
    runpy.run_path(tool, run_name='__main__')


def _model(op):
    cfg = Config.fromfile(osp.join(ROOT, 'configs', 'mmpretrain', f'{op}_t_8xb128_in1k.py'))
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    return cfg, model


@pytest.mark.parametrize('op', ['dwconv', 'ddwconv', 'iddwconv'])
def test_vis_cam(op, tmp_path, monkeypatch):
    from pytorch_grad_cam import GradCAM
    cfg, model = _model(op)
    checkpoint = str(tmp_path / 'model.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, checkpoint)
    image = (np.random.default_rng(0).random((200, 300, 3)) * 255).astype(np.uint8)
    cv2.circle(image, (100, 120), 50, (255, 255, 255), -1)
    cv2.imwrite(str(tmp_path / 'image.jpg'), image)
    out = str(tmp_path / 'cam.jpg')
    _run(osp.join(TOOLS, 'visualization', 'vis_cam.py'),
         [str(tmp_path / 'image.jpg'), cfg.filename, checkpoint, '--target-layers',
          TARGET_LAYER, '--method', 'GradCAM', '--save-path', out, '--device', 'cpu'],
         monkeypatch)
    assert cv2.imread(out).shape == (224, 224, 3)  # drawn on the test pipeline's crop
    # the heat map itself (what the tool overlays) follows the input
    model.eval()
    cam = GradCAM(model=model, target_layers=[model.backbone.stages[3].blocks[1]])
    maps = [cam(input_tensor=x[None])[0] for x in natural_images(2, 224, seed=1)]
    assert maps[0].shape == (224, 224) and maps[0].std() > 0.05
    assert np.abs(maps[0] - maps[1]).mean() > 0.05


def test_mmpretrain_get_flops_misses_the_dynamic_operators(monkeypatch, capsys):
    """mmpretrain's get_flops.py runs but does not count mmdwnet's custom operators: ours
    (tools/get_flops.py, what the docs point to) does."""
    config = osp.join(ROOT, 'configs', 'mmpretrain', 'iddwconv_t_8xb128_in1k.py')
    _run(osp.join(TOOLS, 'analysis_tools', 'get_flops.py'), [config, '--shape', '224'],
         monkeypatch)
    printed = capsys.readouterr().out
    assert 'Flops: 3.759G' in printed and 'Params: 26.244M' in printed


def test_browse_dataset_original_mode(data_root, tmp_path, monkeypatch):
    """browse_dataset.py -m original saves the images (the other modes stop inside
    mmpretrain 1.2.0 with matplotlib >= 3.10, see docs)."""
    config = osp.join(ROOT, 'configs', 'mmpretrain', 'iddwconv_t_8xb128_in1k.py')
    out = tmp_path / 'browse'
    _run(osp.join(TOOLS, 'visualization', 'browse_dataset.py'),
         [config, '-o', str(out), '-n', '1', '-m', 'original', '--cfg-options',
          f'train_dataloader.dataset.data_root={data_root}/imagenet'], monkeypatch)
    saved = list(out.iterdir())
    assert len(saved) == 1 and cv2.imread(str(saved[0])) is not None
