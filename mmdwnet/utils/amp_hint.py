"""A copy-paste fix in mmengine's error when a stock OpenMMLab tool builds the dense
configs' ``AmpOptimWrapper`` on a machine without CUDA.

mmdwnet's own ``tools/train.py`` falls back to float32 by itself. The stock
mmdet/mmseg/mmpretrain tools stop with mmengine's bare assertion ("AmpOptimizerWrapper is
only available training on gpu, npu, mlu or musa"). Our configs import mmdwnet
(``custom_imports``), so the hint can be added where it is needed: this wraps
``AmpOptimWrapper.__init__`` once, and only that assertion's message changes.
"""
import functools

HINT = ('mmdwnet: this machine has no CUDA, and the config trains with mixed precision '
        '(AmpOptimWrapper). Train in float32 with the stock tools by adding '
        '`--cfg-options optim_wrapper.type=OptimWrapper`, or use mmdwnet\'s tools/train.py, '
        'which does so by itself.')


def install() -> None:
    """Add :data:`HINT` to mmengine's no-GPU assertion of ``AmpOptimWrapper`` (once)."""
    from mmengine.optim import AmpOptimWrapper
    init = AmpOptimWrapper.__init__
    if getattr(init, '_mmdwnet_hint', False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except AssertionError as e:
            if 'only available training' not in str(e):
                raise
            raise AssertionError(f'{e}\n{HINT}') from None

    __init__._mmdwnet_hint = True
    AmpOptimWrapper.__init__ = __init__
