"""The backbones' shared rule for a config's default ImageNet checkpoint that is not there."""
import logging
import os.path as osp

from mmengine.logging import print_log


def missing_pretrained_checkpoint(init_cfg, owner: str) -> bool:
    """Whether ``init_cfg`` is a ``Pretrained`` init whose local checkpoint file does not
    exist. If so, log a warning naming the file: the configs point at
    ``checkpoints/<model>_in1k.pth``, which a user may not have trained or converted yet,
    and training from scratch with a warning is more useful than failing."""
    if not (isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained'):
        return False
    path = init_cfg.get('checkpoint')
    if not isinstance(path, str) or '://' in path or osp.isfile(osp.expanduser(path)):
        return False
    print_log(
        f'{owner}: the pretrained checkpoint {path!r} of init_cfg does not exist (looked for '
        f'{osp.abspath(osp.expanduser(path))}); the backbone starts from random '
        'initialisation. Train one with configs/mmpretrain, convert the released weights, '
        'or set model.backbone.init_cfg.checkpoint.',
        logger='current', level=logging.WARNING)
    return True
