"""Loading ImageNet checkpoints into a backbone (mmdwnet/models/utils/pretrained.py)."""

import pytest
import torch

from mmdwnet.models import DWNet
from mmdwnet.utils import build_model, imagenet_classifier_cfg


def test_pretrained_init_with_prefix(tmp_path):
    source = DWNet('tiny', 'iddw')
    state = {f'backbone.{k}': v + 1 for k, v in source.state_dict().items()}
    state['head.fc.weight'] = torch.zeros(3, 768)
    torch.save({'state_dict': state}, tmp_path / 'cls.pth')
    model = DWNet(
        'tiny',
        'iddw',
        init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'cls.pth'),
                      prefix='backbone.'))
    model.init_weights()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[f'backbone.{k}'], msg=k)
    # a prefix no key has: a clear error, not mmengine's bare assertion
    wrong = DWNet('tiny', 'iddw', init_cfg=dict(
        type='Pretrained', prefix='encoder', checkpoint=str(tmp_path / 'cls.pth')))
    with pytest.raises(ValueError, match=r"no key of the checkpoint .*cls\.pth starts with "
                       r"the init_cfg `prefix` 'encoder\.'"):
        wrong.init_weights()


def test_pretrained_init_without_prefix_logs_what_it_left(tmp_path, monkeypatch):
    from mmdwnet.models.utils import pretrained
    source = DWNet('tiny', 'dw', out_indices=(0, 3))
    state = {k: v + 1 for k, v in source.state_dict().items() if not k.startswith('norm0')}
    state['stages.0.blocks.0.pw_conv1.weight'] = torch.zeros(5, 5, 1, 1)  # mis-shaped
    state['extra.weight'] = torch.zeros(2)
    torch.save(state, tmp_path / 'plain.pth')  # a bare state dict
    messages = []
    monkeypatch.setattr(pretrained, 'print_log', lambda msg, logger=None: messages.append(msg))
    model = DWNet('tiny', 'dw', out_indices=(0, 3),
                  init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'plain.pth')))
    model.init_weights()
    own = model.state_dict()
    for k, v in state.items():
        if k in own and k != 'stages.0.blocks.0.pw_conv1.weight':
            assert torch.equal(own[k], v), k
    lines = messages[0].splitlines()
    assert lines[0] == (f'DWNet: initialised {len(own) - 3} of {len(own)} backbone tensors '
                        f"from {tmp_path / 'plain.pth'} (all keys).")
    assert lines[1:] == [
        '  not loaded (shape (5, 5, 1, 1) in the checkpoint, (96, 96, 1, 1) here): '
        'stages.0.blocks.0.pw_conv1.weight',
        '  not loaded (not a parameter of this backbone): extra.weight',
        '  kept at initialisation (nothing loaded into them): norm0.bias, norm0.weight, '
        'stages.0.blocks.0.pw_conv1.weight']


def test_imagenet_checkpoint_initialises_a_dense_backbone(tmp_path, monkeypatch):
    from mmdwnet.models.utils import pretrained
    classifier = build_model(imagenet_classifier_cfg('tiny', 'iddw'))
    with torch.no_grad():
        for p in classifier.parameters():
            p.add_(torch.randn_like(p))
    path = str(tmp_path / 'in1k.pth')
    torch.save({'state_dict': classifier.state_dict(), 'meta': {}}, path)
    messages = []
    monkeypatch.setattr(pretrained, 'print_log',
                        lambda msg, logger=None, level=None: messages.append(msg))
    dense = DWNet('tiny', 'iddw', out_indices=(0, 1, 2, 3), out_norm_cfg=dict(type='BN'),
                  init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    dense.init_weights()
    source = classifier.state_dict()
    own = dense.state_dict()
    copied = [k for k in own if not k.startswith('norm')]
    assert len(copied) == len(own) - 4 * 5
    for key in copied:  # every backbone tensor that exists in both
        assert torch.equal(own[key], source['backbone.' + key]), key
    for i in range(4):  # fresh BN output norms, not the classifier's final LayerNorm
        assert torch.equal(own[f'norm{i}.weight'], torch.ones_like(own[f'norm{i}.weight']))
        assert torch.equal(own[f'norm{i}.running_mean'],
                           torch.zeros_like(own[f'norm{i}.running_mean']))
    log, = messages
    lines = log.splitlines()
    assert lines[0] == (f'DWNet: initialised {len(copied)} of {len(own)} backbone tensors '
                        f"from {path} (the keys under the prefix 'backbone.').")
    assert ('  not loaded (norm3 is another kind of norm here (BatchNorm2d)): '
            'backbone.norm3.weight, backbone.norm3.bias') in lines
    fresh = [ln for ln in lines if ln.startswith('  kept at initialisation')][0]
    assert fresh.count('norm') == 20 and 'norm0.running_var' in fresh


def test_missing_pretrained_checkpoint_warns_and_inits_randomly(tmp_path, monkeypatch):
    import logging

    from mmdwnet.models.utils import pretrained
    messages = []
    monkeypatch.setattr(pretrained, 'print_log',
                        lambda msg, logger=None, level=None: messages.append((msg, level)))
    missing = str(tmp_path / 'no.pth')
    model = DWNet('tiny', init_cfg=dict(type='Pretrained', checkpoint=missing,
                                        prefix='backbone.'))
    model.init_weights()
    (msg, level), = messages
    assert level == logging.WARNING
    assert f"the pretrained checkpoint '{missing}' of init_cfg does not exist" in msg
    assert 'random initialisation' in msg
    assert model.init_cfg == DWNet.default_init_cfg
    # the default init ran: LayerNorms at one, Linear biases at zero
    assert torch.equal(model.norm3.weight, torch.ones(768))
    assert torch.equal(model.stages[0].blocks[0].ffn.layers[1].bias, torch.zeros(96))
