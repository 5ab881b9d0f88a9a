"""Fixtures shared by the tests: generated datasets and a spy on the compiled kernels;
how the tests share the cores under pytest-xdist."""
import os
from collections import OrderedDict

import pytest
import torch
from mmengine.registry import DefaultScope

from mmdwnet.testing import make_datasets


def _share_cores():
    """Under pytest-xdist each worker gets its share of the cores for torch's threads, and
    so do the tools it runs in subprocesses (through OMP_NUM_THREADS): with every worker
    using all cores the threads wait for each other, and the suite ran 18 instead of 12
    minutes on 2 cores."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ['OMP_NUM_THREADS'] = str(threads)
        torch.set_num_threads(threads)


_share_cores()


# the modules of the longest slow tests (training runs through the tools), started first
LONGEST = ('test_train_test_e2e.py', 'test_packaging.py', 'test_resume_and_errors.py',
           'test_stock_tools.py',
           'test_official.py', 'test_benchmark_tools.py')


def _start_rank(item) -> int:
    return LONGEST.index(item.path.name) if item.path.name in LONGEST else len(LONGEST)


def pytest_collection_modifyitems(items):
    """Every worker starts on its share of the slow tests (tools in subprocesses, dense
    models), the longest first, and ends on short ones, so that the workers finish
    together rather than one waiting for the other's long test.

    pytest-xdist's work stealing hands worker k the k-th contiguous share of the list at
    first, and an idle worker steals from the end of another's queue: each share here is
    its slow tests, then short ones. With all slow tests at the front of the list they
    would all fall to the first worker, with the other idle while it runs them."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    slow = sorted((i for i in items if i.get_closest_marker('slow')), key=_start_rank)
    fast = iter([i for i in items if not i.get_closest_marker('slow')])
    ordered, left = [], len(items)
    for k in range(workers):
        share = left // (workers - k)  # as xdist's first distribution counts them
        own = slow[k::workers]
        ordered += own + [i for _, i in zip(range(share - len(own)), fast)]
        left -= share
    items[:] = ordered + list(fast)


@pytest.fixture(autouse=True)
def fresh_default_scope():
    """Every test starts with no default scope, as a fresh process has, whatever the tests
    that ran before it in the same worker set (under pytest-xdist the order differs from run
    to run); the scopes of the earlier tests are put back afterwards."""
    saved = DefaultScope._instance_dict
    DefaultScope._instance_dict = OrderedDict()
    yield
    DefaultScope._instance_dict = saved


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
