"""Fixtures shared by the tests: generated datasets and a spy on the compiled kernels."""
import pytest

from mmdwnet.testing import make_datasets


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    """COCO, ADE20K and ImageNet where the configs look for them under the root, a few
    generated images each."""
    root = tmp_path_factory.mktemp('data')
    make_datasets(str(root), ('coco', 'ade20k'), num_train=2, num_val=2)
    make_datasets(str(root), ('imagenet', ), num_train=1, num_val=1)
    return root


class CompiledOpsSpy:
    """Stands in for the compiled CPU extension: forwards every call and records the op's
    name and the dtype of its first operand, so that a test can show which kernels ran."""

    def __init__(self, ops):
        self.ops, self.calls = ops, []

    def __getattr__(self, name):
        op = getattr(self.ops, name)

        def call(*args):
            self.calls.append((name, args[0].dtype))
            return op(*args)

        return call

    def ran(self, dtype=None):
        """Names of the ops that ran (on operands of ``dtype``, if given)."""
        return {name for name, d in self.calls if dtype is None or d == dtype}


@pytest.fixture
def compiled_ops(monkeypatch):
    """The compiled CPU kernels, behind a :class:`CompiledOpsSpy` (which, like the real
    loader, gives None while ``MMDWNET_CPU_EXTENSION=0``)."""
    from mmdwnet.ops import cpu_extension
    real_load = cpu_extension.load
    ops = real_load()
    assert ops is not None, f'the compiled CPU kernels do not build: {cpu_extension.error()}'
    spy = CompiledOpsSpy(ops)
    monkeypatch.setattr(cpu_extension, 'load',
                        lambda: spy if cpu_extension.enabled() else None)
    return spy
