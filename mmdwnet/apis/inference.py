"""One-image inference through the task libraries' own inferencers."""
import os.path as osp
from typing import Dict

import numpy as np
from mmengine.config import Config
from PIL import Image

from mmdwnet.utils.launch import LaunchError


def run_inference(cfg: Config, checkpoint: str, image: str, out: str, device: str = 'cpu',
                  score_thr: float = 0.3) -> Dict:
    """Predict ``image`` with the model of ``cfg`` and ``checkpoint``.

    Returns:
        dict: ``lines`` (a summary to print), ``out`` (the saved PNG, None for
        classification) and ``prediction`` (the inferencer's prediction).
    """
    for path, what in ((checkpoint, 'checkpoint'), (image, 'image')):
        if not osp.isfile(path):
            raise LaunchError(f'{what} {path!r} does not exist (looked for '
                              f'{osp.abspath(path)})')
    scope = cfg.default_scope
    if scope == 'mmpretrain':
        from mmpretrain.apis import ImageClassificationInferencer
        inferencer = ImageClassificationInferencer(cfg, pretrained=checkpoint, device=device)
        prediction = inferencer(image)[0]
        classes = inferencer.classes or [str(i) for i in range(len(prediction['pred_scores']))]
        top5 = np.argsort(-prediction['pred_scores'])[:5]
        lines = [f'{rank + 1}. {classes[i]} ({prediction["pred_scores"][i]:.4f})'
                 for rank, i in enumerate(top5)]
        return dict(lines=lines, out=None, prediction=prediction)
    if scope == 'mmdet':
        from mmdet.apis import DetInferencer
        inferencer = DetInferencer(cfg, weights=checkpoint, device=device, show_progress=False)
        result = inferencer(image, return_vis=True, no_save_pred=True, no_save_vis=True,
                            pred_score_thr=score_thr)
        prediction = result['predictions'][0]
        kept = sum(s >= score_thr for s in prediction['scores'])
        summary = f'{kept} objects scoring at least {score_thr}'
    else:
        from mmseg.apis import MMSegInferencer
        inferencer = MMSegInferencer(cfg, weights=checkpoint, device=device)
        result = inferencer(image, return_vis=True)
        prediction = result['predictions']
        labels = np.unique(prediction)
        summary = f'{len(labels)} classes in the map'
    picture = result['visualization']  # a list for mmdet, the array for one image in mmseg
    Image.fromarray(picture[0] if isinstance(picture, list) else picture).save(out)
    return dict(lines=[summary, f'saved {out}'], out=out, prediction=prediction)


def prediction_to_json(prediction) -> Dict:
    """The prediction of :func:`run_inference` as plain lists: ``pred_scores``
    (classification), ``bboxes``/``scores``/``labels`` (detection; masks left out) or
    ``sem_seg`` (the segmentation label map)."""
    if isinstance(prediction, dict) and 'pred_scores' in prediction:
        return dict(pred_scores=np.asarray(prediction['pred_scores']).tolist())
    if isinstance(prediction, dict):
        return {k: np.asarray(prediction[k]).tolist() for k in ('bboxes', 'scores', 'labels')}
    return dict(sem_seg=np.asarray(prediction).tolist())
