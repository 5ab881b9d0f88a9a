"""analysis_tools.clean_process.CleanProcess, which the benchmark tools measure peak memory
in: run in a fresh interpreter, as the tools run it (a pytest worker has run torch's
threads already, which a fork must not inherit)."""
import json
import subprocess
import sys

import pytest
from helpers import ROOT, tools_env

pytestmark = pytest.mark.slow  # a subprocess

SCRIPT = r"""
import json, os, sys, torch
from analysis_tools.clean_process import CleanProcess

def resident():  # MiB
    with open('/proc/self/status') as f:
        return int(next(ln for ln in f if ln.startswith('VmRSS:')).split()[1]) / 1024

def product():
    a = torch.ones(256, 256)
    return torch.get_num_threads(), float((a @ a)[0, 0])

def fail():
    raise ValueError('a bad value')

torch.set_num_threads(2)
clean = CleanProcess()  # the copy: before the 256 MiB below
kept = torch.ones(2**26)
out = dict(here=resident(), child=clean.call(resident),
           pids=[os.getpid(), clean.pid, clean.call(os.getpid), clean.call(os.getpid)],
           product=clean.call(product))
for fn, args in ((fail, ()), (os._exit, (3, ))):
    try:
        clean.call(fn, *args, what='the probe')
    except RuntimeError as e:
        out.setdefault('errors', []).append(str(e))
out['after_errors'] = clean.call(sum, [1, 2], start=3)
clean.close()
clean.close()
try:
    clean.call(os.getpid)
except RuntimeError as e:
    out['closed'] = str(e)
print(json.dumps(out))
"""


def test_children_run_as_in_a_fresh_process():
    result = subprocess.run([sys.executable, '-c', SCRIPT], cwd=ROOT, env=tools_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # the child holds nothing this process allocated after the copy was taken
    assert out['here'] - out['child'] >= 250, out
    # every call in a new child of the copy, with the copy's torch threads
    here, copy, first, second = out['pids']
    assert len({here, copy, first, second}) == 4
    assert out['product'] == [2, 256.0]
    # an exception in the child and its death are named, and the copy goes on serving
    raised, died = out['errors']
    assert raised.startswith('the probe failed:\nTraceback') and \
        raised.rstrip().endswith('ValueError: a bad value'), raised
    assert died == 'the probe failed:\nthe child process ended with exit status 3 and no result'
    assert out['after_errors'] == 6
    assert out['closed'] == 'CleanProcess.call: the process was closed'


def test_cpu_memory_needs_a_clean_process():
    from analysis_tools.memory import measure_memory
    with pytest.raises(ValueError, match="peak memory on 'cpu' is measured in a child of a "
                                         'CleanProcess; got clean=None'):
        measure_memory('dwconv_t', 'cpu', 1, 32, 'fp32', True)
