"""What tools/train.py does before the Runner (mmdwnet/utils/launch.py)."""


def test_compile_option_is_taken_for_the_backbone():
    """mmengine's `compile` option: True -> torch.compile defaults, a dict -> its arguments,
    False/None -> nothing; anything else is a clear error. tools/train.py compiles the
    backbone in place, so the state-dict keys stay those of the checkpoints."""
    import pytest
    import torch
    from mmengine.config import Config

    from mmdwnet.models import DWNet
    from mmdwnet.utils.launch import LaunchError, compile_backbone, take_compile_option
    assert take_compile_option(Config(dict(compile=True))) == {}
    assert take_compile_option(Config(dict(compile=dict(backend='eager')))) == {
        'backend': 'eager'}
    assert take_compile_option(Config(dict(compile=False))) is None
    cfg = Config(dict(a=1))
    assert take_compile_option(cfg) is None and 'compile' not in cfg
    with pytest.raises(LaunchError, match="compile must be True, False or a dict of "
                       "torch.compile arguments, got 'yes'"):
        take_compile_option(Config(dict(compile='yes')))
    model = torch.nn.Module()
    small = dict(embed_dims=16, depths=[1, 1, 1, 1], group_channels=[4, 8, 16, 32])
    model.backbone = DWNet(small)
    keys = list(model.state_dict())
    compile_backbone(model, dict(backend='eager'))
    assert list(model.state_dict()) == keys
    assert model.backbone._compiled_call_impl is not None
