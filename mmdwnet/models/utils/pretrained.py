"""Loading an ImageNet checkpoint into a backbone: the shared rule for a config's default
checkpoint that is not there, and a loader that says what it left."""
import logging
import os.path as osp
import re
from typing import Optional

from mmengine.logging import print_log
from torch import nn


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


def load_pretrained_backbone(backbone: nn.Module, path: str, prefix: Optional[str],
                             map_location='cpu', owner: str = 'DWNet') -> None:
    """Load the checkpoint's tensors under ``prefix`` with mmengine's loaders into
    ``backbone``, copy those that fit and log exactly which keys were not loaded and why
    (e.g. an ImageNet classifier's final LayerNorm for a detection backbone with BN output
    norms ``norm{i}``). mmengine's ``load_state_dict`` alone would refuse mis-shaped
    tensors and load a LayerNorm's weight into a BatchNorm of the same width.

    Args:
        backbone (nn.Module): The backbone to initialise.
        path (str): The checkpoint (any path mmengine's loaders read).
        prefix (str, optional): Load only the keys under this prefix (e.g.
            ``'backbone.'``), without it.
        map_location: Where to load the tensors. Defaults to 'cpu'.
        owner (str): The backbone's name in the messages. Defaults to 'DWNet'.
    """
    from mmengine.runner.checkpoint import _load_checkpoint, _load_checkpoint_with_prefix
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        try:
            state = _load_checkpoint_with_prefix(prefix, path, map_location)
        except AssertionError:  # mmengine's way of saying that no key has the prefix
            raise ValueError(f'{owner}: no key of the checkpoint {path} starts with the '
                             f'init_cfg `prefix` {prefix!r}') from None
    else:
        prefix = ''
        checkpoint = _load_checkpoint(path, map_location=map_location)
        state = checkpoint.get('state_dict', checkpoint)
    own = backbone.state_dict()
    reasons = {}  # key (without the prefix) -> why it is not loaded
    for key, value in state.items():
        norm = key.split('.')[0]
        if key not in own:
            continue  # load_state_dict reports it as unexpected
        if re.fullmatch(r'norm\d', norm) and (
                {k for k in state if k.startswith(norm + '.')}
                != {k for k in own if k.startswith(norm + '.')}):
            reasons[key] = (f'{norm} is another kind of norm here '
                            f'({type(getattr(backbone, norm)).__name__})')
        elif value.shape != own[key].shape:
            reasons[key] = (f'shape {tuple(value.shape)} in the checkpoint, '
                            f'{tuple(own[key].shape)} here')
    loaded = {k: v for k, v in state.items() if k not in reasons}
    unexpected = backbone.load_state_dict(loaded, strict=False).unexpected_keys
    reasons.update(dict.fromkeys(unexpected, 'not a parameter of this backbone'))
    # what the checkpoint did not set (load_state_dict's missing_keys leaves out the
    # BatchNorm counters it fills in itself)
    missing = sorted(set(own) - set(loaded))
    by_reason = {}
    for key, reason in reasons.items():
        by_reason.setdefault(reason, []).append(prefix + key)
    where = f'the keys under the prefix {prefix!r}' if prefix else 'all keys'
    lines = [f'{owner}: initialised {len(own) - len(missing)} of {len(own)} backbone '
             f'tensors from {path} ({where}).']
    lines += [f'  not loaded ({reason}): {", ".join(keys)}'
              for reason, keys in by_reason.items()]
    if missing:
        lines.append(f'  kept at initialisation (nothing loaded into them): '
                     f'{", ".join(missing)}')
    print_log('\n'.join(lines), logger='current')
