"""mmdwnet's classifiers in MMPretrain's model hub, by their config names.

``import mmdwnet`` registers ``configs/mmpretrain/model-index.yml`` (the ImageNet models
and ablations; detection and segmentation configs run through their own inferencers by
config path), so that ``mmpretrain.list_models('*dwconv*')``,
``get_model('dwconv_t_8xb128_in1k', pretrained=PATH)``, ``inference_model(name, image)``
and ``ImageClassificationInferencer(name)`` work as for MMPretrain's own models.
"""
import os.path as osp

from mmdwnet.utils.model_zoo import CONFIG_ROOT

MODEL_INDEX = osp.join(CONFIG_ROOT, 'mmpretrain', 'model-index.yml')
_registered = []


def register_models() -> None:
    """Register :data:`MODEL_INDEX` with ``mmpretrain.apis.ModelHub`` (once per process;
    the metafiles' ``configs/...`` paths resolve in the package's configs)."""
    if _registered:
        return
    from mmpretrain.apis import ModelHub
    ModelHub.register_model_index(MODEL_INDEX, config_prefix=osp.dirname(CONFIG_ROOT))
    _registered.append(MODEL_INDEX)
