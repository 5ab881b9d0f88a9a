import os
import subprocess
import sys

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow  # tools in subprocesses


def _install(*args, python=sys.executable):
    env = dict(os.environ, MMDWNET_PYTHON=python)
    return subprocess.run(['bash', os.path.join(ROOT, 'tools', 'install.sh'), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def test_second_run_keeps_the_installation():
    # the suite runs in an environment the script set up: nothing to install the second time
    result = _install()
    assert result.returncode == 0, result.stderr
    assert '[mmdwnet setup] everything is already installed' in result.stdout
    assert 'pip install' not in result.stdout
    assert 'ready: torch ' in result.stdout and 'mmdwnet 0.1.0' in result.stdout


def test_clear_errors():
    result = _install(python='/nonexistent/python3')
    assert result.returncode == 1
    assert 'ERROR: /nonexistent/python3 is not a working Python >= 3.8' in result.stderr
    result = _install('frobnicate')
    assert result.returncode == 1
    assert ("ERROR: unknown command 'frobnicate' (allowed: demo, test, lint, or nothing)"
            in result.stderr)
