"""Helpers of the tests that run the tools: CPU smoke-run overrides, running a tool,
checking that a run trained, comparing the demo with an in-process forward. (The generated
data is the ``data_root`` fixture of ``tests/conftest.py``, which also puts this directory
on ``sys.path``.)"""
import atexit
import os.path as osp
import subprocess
import sys

from mmdwnet.testing import smoke_run_options as overrides  # noqa: F401

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def tools_env():
    """This process's environment with tools/ first on ``PYTHONPATH``: a Python a test starts
    imports ``analysis_tools`` as the tools (their own folder) and the tests (pytest.ini's
    ``pythonpath``) do."""
    import os
    paths = [osp.join(ROOT, 'tools'), os.environ.get('PYTHONPATH')]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))


# The server the tool runs fork from. Its only work is ``import mmdwnet``: what every tool
# under tools/ does first, and most of a tool run's start-up (8 s of import on 2 cores,
# more when the other test worker is busy). It runs no torch operation, so OpenMP has
# started no threads when it forks, and a child forked from it runs as a fresh interpreter
# would: the child takes the caller's directory, environment and arguments, its output
# goes to files, and the tool runs as ``__main__`` (``runpy``) with its own directory
# first on ``sys.path``. An exception or ``sys.exit`` ends the child as it would end
# ``python tools/<tool>``: traceback, exit status and exit handlers alike.
_FORK_SERVER = r"""
import json, os, runpy, sys
import mmdwnet  # noqa: F401  (if this fails, the server ends and run_tool starts processes)
print('ready', flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid:
        status = os.waitpid(pid, 0)[1]
        print(json.dumps({'returncode': os.waitstatus_to_exitcode(status)}), flush=True)
        continue
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, request['stdout'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request['stderr'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update(request['env'])
    sys.argv = request['argv']
    sys.path[0] = os.path.dirname(request['argv'][0])
    runpy.run_path(request['argv'][0], run_name='__main__')
    raise SystemExit(0)
"""


def _environment():
    """This process's environment but for the variable pytest sets to the current test."""
    import os
    return {k: v for k, v in os.environ.items() if k != 'PYTEST_CURRENT_TEST'}


class _ToolForkServer:
    """One per test process, started on first use; see ``_FORK_SERVER``."""

    def __init__(self):
        import threading
        self.env = _environment()
        self.lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, '-c', _FORK_SERVER], cwd=ROOT,
                                     env=self.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        reply = self.proc.stdout.readline()
        self.ready = reply == 'ready\n'  # '' where the import failed and the server ended

    def usable(self) -> bool:
        return self.ready and self.proc.poll() is None

    def run(self, argv, cwd):
        import json
        import os
        import tempfile
        with self.lock, tempfile.TemporaryDirectory() as tmp:
            out, err = osp.join(tmp, 'stdout'), osp.join(tmp, 'stderr')
            env = dict(os.environ)  # pytest's PYTEST_CURRENT_TEST included
            self.proc.stdin.write(json.dumps(dict(argv=list(argv), cwd=cwd, env=env,
                                                  stdout=out, stderr=err)) + '\n')
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
            if not reply:
                raise RuntimeError('the tool fork server ended')
            returncode = json.loads(reply)['returncode']
            with open(out) as f_out, open(err) as f_err:
                stdout, stderr = f_out.read(), f_err.read()
        return subprocess.CompletedProcess([sys.executable, *argv], returncode, stdout, stderr)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


_SERVER = None  # this process's fork server, started on first use


def _tool_fork_server():
    """The running fork server of this process, or None where it cannot serve (it failed
    to import mmdwnet, or it ended). Where the environment changed since it started (a
    library or a test in this process set a variable, which might change what the server
    imported), a new server starts from the current environment: falling back to new
    processes would cost each later run of a tool its imports again."""
    global _SERVER
    if _SERVER is None or (_SERVER.ready and _environment() != _SERVER.env):
        if _SERVER is None:
            atexit.register(lambda: _SERVER.close())  # whichever server runs at the end
        else:
            _SERVER.close()
        _SERVER = _ToolForkServer()
    return _SERVER if _SERVER.usable() else None


def run_tool(tool, *args, check=True, env=None):
    """Run ``tools/<tool>`` with this Python from the repository root; unless ``check`` is
    False, a failure raises with the end of its output. Without ``env`` the run is forked
    from a process that has imported mmdwnet (``_FORK_SERVER``); with ``env`` (which may
    change what is imported) it is a new process."""
    argv = [osp.join(ROOT, 'tools', tool), *args]
    server = _tool_fork_server() if env is None else None
    if server is not None:
        result = server.run(argv, ROOT)
    else:
        result = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                                cwd=ROOT, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f'{tool} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
    return result


def cfg_with_options(config, options=()):
    """``config`` loaded with ``--cfg-options``-style ``key=value`` overrides applied."""
    import argparse

    from mmengine.config import Config, DictAction
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(parser.parse_args(['--cfg-options', *options]).cfg_options
                        if options else {})
    return cfg


def initial_checkpoint(config, options, path):
    """Save the weights a run of ``config`` (with ``options``) starts from, initialised as
    the Runner initialises them; pass ``load_from=path`` to the run, then
    :func:`assert_trained` can compare where it ended with where it started."""
    import torch

    from mmdwnet.utils import build_model
    torch.manual_seed(0)
    model = build_model(cfg_with_options(config, options))
    model.init_weights()
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return str(path)


def logged_losses(work_dir):
    """The total training loss at every logged iteration of the newest run in
    ``work_dir`` (mmengine's ``vis_data/scalars.json``)."""
    import glob
    import json
    runs = sorted(glob.glob(osp.join(str(work_dir), '*', 'vis_data', 'scalars.json')))
    assert runs, f'no scalars.json under {work_dir}'
    with open(runs[-1]) as f:
        rows = [json.loads(line) for line in f]
    return [row['loss'] for row in rows if 'loss' in row]


def assert_trained(work_dir, checkpoint, initial, falls_by=None, min_iters=1):
    """The run logged finite losses (at least ``min_iters`` of them, falling by a factor of
    ``falls_by`` from first to last where given); its checkpoint holds finite weights, and
    its parameters moved away from the ``initial`` ones."""
    import math

    import torch
    losses = logged_losses(work_dir)
    assert len(losses) >= min_iters and all(math.isfinite(v) for v in losses), losses
    if falls_by is not None:
        assert losses[-1] * falls_by <= losses[0], \
            f'the loss did not fall by {falls_by}x: {losses}'
    trained = torch.load(checkpoint, map_location='cpu', weights_only=False)['state_dict']
    start = torch.load(initial, map_location='cpu', weights_only=False)['state_dict']
    assert trained.keys() == start.keys()
    floats = [k for k, v in trained.items() if v.is_floating_point()]
    bad = [k for k in floats if not torch.isfinite(trained[k]).all()]
    assert not bad, f'non-finite weights after training: {bad[:5]}'
    moved = [k for k in floats if not torch.equal(trained[k], start[k])]
    # every weight the optimizer updates moves; buffers such as BN statistics of frozen
    # layers or fixed position tables may not
    assert len(moved) >= 0.5 * len(floats), f'{len(moved)} of {len(floats)} tensors moved'
    return losses


def assert_demo_matches_in_process(config, checkpoint, image, pred_json):
    """The prediction tools/demo.py wrote (``--pred-out``) equals an in-process forward of
    the same checkpoint, loaded strictly, through the task library's own single-image API
    (mmpretrain ``ImageClassificationInferencer`` on a strictly loaded model, mmdet
    ``inference_detector``, mmseg ``inference_model``)."""
    import json

    import numpy as np
    import torch
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint

    from mmdwnet.utils import build_model
    with open(pred_json) as f:
        demo = json.load(f)
    cfg = cfg_with_options(config)
    model = build_model(cfg)
    load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    model.cfg = model._config = cfg  # what the task APIs read the pipeline from
    scope = cfg.default_scope
    init_default_scope(scope)  # as init_detector / init_model do before these APIs
    with torch.no_grad():
        if scope == 'mmpretrain':
            from mmpretrain.apis import ImageClassificationInferencer
            ours = ImageClassificationInferencer(model, device='cpu')(image)[0]
            np.testing.assert_allclose(demo['pred_scores'], ours['pred_scores'], atol=1e-5)
        elif scope == 'mmdet':
            from mmdet.apis import inference_detector
            ours = inference_detector(model, image).pred_instances
            assert len(demo['scores']) == len(ours.scores) > 0
            np.testing.assert_allclose(demo['scores'], ours.scores.numpy(), atol=1e-4)
            np.testing.assert_allclose(demo['bboxes'], ours.bboxes.numpy(), atol=1e-2)
            assert demo['labels'] == ours.labels.tolist()
        else:
            from mmseg.apis import inference_model
            ours = inference_model(model, image).pred_sem_seg.data[0].numpy()
            same = (np.asarray(demo['sem_seg']) == ours).mean()
            assert same == 1.0, f'{same:.4f} of the pixels agree'


def reporting_config(config, tmp_path, scale=(320, 240)):
    """``config``, or for a detector or segmentor a child of it that tests at ``scale``
    (the generated images' own size, where the stock pipelines enlarge them to 1333x800 or
    2048x512, which only costs time here) and, for a detector, reports its 20 best boxes at
    any score, so that an untrained or synthetic model still predicts something to
    compare."""
    from mmengine.config import Config
    cfg = Config.fromfile(config)
    if cfg.default_scope not in ('mmdet', 'mmseg'):
        return config
    pipeline = [dict(t) for t in cfg.test_dataloader.dataset.pipeline]
    resize, = [t for t in pipeline if t['type'] == 'Resize']
    resize['scale'] = tuple(scale)
    # the inferencers read test_dataloader's pipeline, mmseg's inference_model test_pipeline
    body = (f'test_pipeline = {pipeline!r}\n'
            'test_dataloader = dict(dataset=dict(pipeline=test_pipeline))\n')
    if cfg.default_scope == 'mmdet':
        body += 'model = dict(test_cfg=dict(rcnn=dict(score_thr=0.0, max_per_img=20)))\n'
    child = tmp_path / f'report_{osp.basename(config)}'
    child.write_text(f'_base_ = {config!r}\n{body}')
    return str(child)


def randomise_bn_stats(model):
    """Random BatchNorm statistics and affine parameters (seeded), so that folding them
    changes what a wrong fold would leave unchanged."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
