"""Shared by the tool tests: CPU smoke-run overrides, running a tool (the generated data
is the ``data_root`` fixture of ``tests/conftest.py``)."""
import os.path as osp
import subprocess
import sys

from mmdwnet.engine.smoke import smoke_run_options as overrides  # noqa: F401

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def run_tool(tool, *args, check=True):
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', tool), *args],
                            capture_output=True, text=True, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f'{tool} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
    return result
