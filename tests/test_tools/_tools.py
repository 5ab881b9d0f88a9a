"""Shared by the tool tests: generated data, CPU smoke-run overrides, running a tool."""
import os.path as osp
import subprocess
import sys

import pytest

from mmdwnet.datasets import make_ade20k, make_coco, make_imagenet
from mmdwnet.engine.smoke import smoke_run_options as overrides  # noqa: F401

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    make_coco(str(root / 'coco'), num_train=2, num_val=2)
    make_ade20k(str(root / 'ade' / 'ADEChallengeData2016'), num_train=2, num_val=2)
    make_imagenet(str(root / 'imagenet'), num_train=1, num_val=1)
    return root


def run_tool(tool, *args, check=True):
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', tool), *args],
                            capture_output=True, text=True, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f'{tool} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
    return result
