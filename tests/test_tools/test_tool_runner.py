"""The tests' tool runner (``helpers.run_tool``): a run forked from the process that has
imported mmdwnet ends as the same run in a new process does, also after the environment
changed."""
import os

import helpers
from helpers import run_tool


def test_forked_run_ends_as_a_new_process_run(monkeypatch):
    args = ('get_flops.py', 'configs/nope.py', '--shape', '0')

    def no_new_process(*args, **kwargs):
        raise AssertionError('run_tool started a new process instead of forking')

    with monkeypatch.context() as patched:  # the runs below are served by fork servers
        patched.setattr(helpers.subprocess, 'run', no_new_process)
        forked = run_tool(*args, check=False)
        # a variable set since the server started: a new server, from this environment
        patched.setenv('MMDWNET_TEST_NEW_VARIABLE', '1')
        again = run_tool(*args, check=False)
        assert helpers._SERVER.env['MMDWNET_TEST_NEW_VARIABLE'] == '1'
    assert again.returncode == 2 and again.stderr == forked.stderr
    fresh = run_tool(*args, check=False, env=dict(os.environ))  # a new process
    # argparse's error: exit status 2, the usage line naming the tool
    assert forked.returncode == fresh.returncode == 2
    assert forked.stdout == fresh.stdout == ''
    assert forked.stderr == fresh.stderr
    assert forked.stderr.startswith('usage: get_flops.py')
