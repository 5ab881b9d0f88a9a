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

    from mmdwnet.utils.complexity import build_task_model
    torch.manual_seed(0)
    model = build_task_model(cfg_with_options(config, options))
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
