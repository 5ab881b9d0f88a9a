"""MMPretrain's model hub knows mmdwnet's classifiers by their config names after
``import mmdwnet``: list_models, get_model (with pretrained=PATH), inference_model and
ImageClassificationInferencer."""
import numpy as np
import pytest
import torch
from mmpretrain import ImageClassificationInferencer, get_model, inference_model, list_models

import mmdwnet  # noqa: F401  (registers the model index)
from mmdwnet.models import DWNet
from mmdwnet.utils.model_zoo import load_models

CLASSIFIERS = {f'{op}_{size}_8xb128_in1k' for op in ('dwconv', 'ddwconv', 'iddwconv')
               for size in 'tb'}
ABLATIONS = {'dwconv_t_se_8xb128_in1k', 'dwconv_t_ln_8xb128_in1k', 'dwconv_t_ccbn_8xb128_in1k',
             'iddwconv_t_dw_8xb128_in1k', 'dwconv_t_sc_8xb128_in1k', 'dwconv_t_384px_ft',
             'dwconv_t_k12_384px_ft'}


def test_list_models():
    assert set(list_models('*dwconv*')) == CLASSIFIERS | ABLATIONS
    assert set(list_models('*localmlp*')) == {
        'localmlp_t_8xb128_in1k', 'localmlp_t_sw_8xb128_in1k', 'localmlp_b_8xb128_in1k'}
    assert 'cascade_dwconv_t_3x' not in list_models('*cascade*')  # detectors: by config path


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """Weights of DW-T that are not its initial ones."""
    torch.manual_seed(0)
    model = get_model('dwconv_t_8xb128_in1k')
    model.init_weights()
    with torch.no_grad():
        model.head.fc.bias.copy_(torch.linspace(-1, 1, 1000))
    path = tmp_path_factory.mktemp('hub') / 'dwconv_t.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return str(path), model


@pytest.mark.parametrize('name', ['ddwconv_t_8xb128_in1k', 'iddwconv_t_dw_8xb128_in1k'])
def test_get_model_builds_the_config(name):
    model = get_model(name)
    assert isinstance(model.backbone, DWNet)
    expected, = [m for m in load_models() if m['Name'] == name]
    assert sum(p.numel() for p in model.parameters()) == expected['Metadata']['Parameters']


def test_get_model_pretrained_and_inference(checkpoint, tmp_path):
    path, trained = checkpoint
    model = get_model('dwconv_t_8xb128_in1k', pretrained=path)
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    import cv2
    image = np.random.default_rng(0).integers(0, 256, (256, 320, 3), dtype=np.uint8)
    image_path = str(tmp_path / 'image.jpg')
    cv2.imwrite(image_path, image)
    result = inference_model('dwconv_t_8xb128_in1k', image_path, pretrained=path)
    assert 0 <= result['pred_label'] < 1000 and result['pred_scores'].shape == (1000, )
    inferencer = ImageClassificationInferencer('dwconv_t_8xb128_in1k', pretrained=path)
    again, = inferencer(image_path)
    assert again['pred_label'] == result['pred_label']
    np.testing.assert_allclose(again['pred_scores'], result['pred_scores'], rtol=1e-5)
    # the weights are used: the bias ramp puts the top score on the last classes
    assert result['pred_label'] > 900
