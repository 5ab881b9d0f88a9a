"""The tests' tool runner (``helpers.run_tool``): a run forked from the process that has
imported mmdwnet ends as the same run in a new process does."""
import os

from helpers import _tool_fork_server, run_tool


def test_forked_run_ends_as_a_new_process_run():
    args = ('get_flops.py', 'configs/nope.py', '--shape', '0')
    forked = run_tool(*args, check=False)
    assert _tool_fork_server() is not None  # it served the run above
    fresh = run_tool(*args, check=False, env=dict(os.environ))  # a new process
    # argparse's error: exit status 2, the usage line naming the tool
    assert forked.returncode == fresh.returncode == 2
    assert forked.stdout == fresh.stdout == ''
    assert forked.stderr == fresh.stderr
    assert forked.stderr.startswith('usage: get_flops.py')
