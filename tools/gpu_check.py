"""The whole GPU acceptance on one CUDA GPU, in one command (``bash tools/gpu_check.sh``).

Steps, each recorded with its result, seconds and output; a failing step does not stop the
others:

1. ``cuda_tests``: the CUDA tests of the operators (Triton chosen by the dispatch, Triton
   against the PyTorch backend, Inductor), none of them skipped;
2. ``triton_vs_reference``: the Triton forward, input and kernel gradients against a
   float64 reference at DWNet-T's stage-1 shape, float32 within 1e-4 and float16/bfloat16
   within 2e-2 of the largest value;
3. ``amp_training_step``: a training step of each DWNet-T classifier under AMP float16 and
   bfloat16 (loss finite, gradients finite and with cosine similarity above 0.99 to the
   float32 step's);
4. ``kernel_times``: the Triton kernels at DWNet-T's stage shapes, batch 128, bfloat16,
   timed with CUDA events against the predicted lower bounds
   (:mod:`analysis_tools.gpu_roofline`): the fraction of the bound each reaches;
5. ``benchmark``: ``tools/benchmark.py`` on CUDA, float32 / float16 / bfloat16, DWNet-T
   against Swin-T and ConvNeXt-T (inference and training, peak memory);
6. ``train_mmdet`` / ``train_mmseg`` / ``train_mmpretrain``: the canonical
   ``tools/dist_train.sh CONFIG 1`` of each task's I-D-DW-T config (with its AMP optimizer
   wrapper where it has one) for a few iterations on generated data, then
   ``tools/dist_test.sh`` on the checkpoint.

Writes ``report.json`` and ``report.md`` under ``--out``; exit status 1 if any step failed,
2 where no CUDA GPU is visible.
"""
import argparse
import glob
import json
import os
import os.path as osp
import platform
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TASK_CONFIGS = {
    'mmdet': 'configs/mmdet/cascade_iddwconv_t_3x.py',
    'mmseg': 'configs/mmseg/upernet_iddwconv_t_512x512_160k_ade20k.py',
    'mmpretrain': 'configs/mmpretrain/iddwconv_t_8xb128_in1k.py',
}


def _run(cmd: List[str], log: Callable[[str], None], timeout: float) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, osp.join(ROOT, 'tools'),
         os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep))
    env.setdefault('PYTHON', sys.executable)  # tools/dist_*.sh: this interpreter
    log('$ ' + ' '.join(cmd))
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=timeout)
    output = result.stdout + result.stderr
    if result.returncode:
        raise RuntimeError(f'exit status {result.returncode}:\n{output[-4000:]}')
    return output


def step_cuda_tests(args, log) -> Dict:
    output = _run([sys.executable, '-m', 'pytest', '-rs', '-q', '-p', 'no:cacheprovider',
                   'tests/test_ops/test_triton_idwconv.py', 'tests/test_ops/test_dispatch.py'],
                  log, timeout=300)
    if ' skipped' in output.splitlines()[-1]:
        raise RuntimeError(f'CUDA tests skipped on a GPU machine:\n{output[-3000:]}')
    return dict(summary=output.strip().splitlines()[-1])


def step_triton_vs_reference(args, log) -> Dict:
    import torch

    from mmdwnet.ops import inhomogeneous_dwconv2d, use_backend
    from mmdwnet.testing.reference import idwconv as reference
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 96, 56, 56, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 32, 7, 7, 56, 56, generator=gen, dtype=torch.float64) / 7
    gy = torch.randn(2, 96, 56, 56, generator=gen, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    expected = [reference(xr, wr)]
    expected += torch.autograd.grad(expected[0], (xr, wr), gy)
    errors = {}
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 2e-2)):
        xc, wc = (t.to('cuda', dtype).requires_grad_() for t in (x, w))
        with use_backend('triton'):
            y = inhomogeneous_dwconv2d(xc, wc)
            got = [y, *torch.autograd.grad(y, (xc, wc), gy.to('cuda', dtype))]
        for name, ours, ref in zip(('forward', 'grad_input', 'grad_weight'), got, expected):
            err = ((ours.double().cpu() - ref).abs().max() / ref.abs().max()).item()
            errors[f'{name}_{str(dtype)[6:]}'] = err
            if not err < tol:
                raise AssertionError(f'{name} in {dtype}: error {err:.2e} of the largest value, '
                                     f'above {tol}')
    return dict(relative_errors=errors)


def step_amp_training_step(args, log) -> Dict:
    import torch
    import torch.nn.functional as F

    from mmdwnet.utils import build_model, imagenet_classifier_cfg
    results = {}
    for conv_type in ('dw', 'ddw', 'iddw'):
        torch.manual_seed(0)
        model = build_model(imagenet_classifier_cfg('tiny', conv_type)).cuda().train()
        images = torch.randn(8, 3, 224, 224, device='cuda').contiguous(
            memory_format=torch.channels_last)
        labels = torch.randint(0, 1000, (8, ), device='cuda')
        grads = {}
        for dtype in ('fp32', 'fp16', 'bf16'):
            model.zero_grad()
            with torch.autocast('cuda', dtype=getattr(torch, {
                    'fp16': 'float16', 'bf16': 'bfloat16'}.get(dtype, 'float32')),
                                enabled=dtype != 'fp32'):
                logits = model(images, mode='tensor')
                loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            flat = torch.cat([p.grad.flatten().float() for p in model.parameters()
                              if p.grad is not None])
            if not (torch.isfinite(loss) and torch.isfinite(flat).all()):
                raise AssertionError(f'{conv_type} {dtype}: loss {loss.item()} or gradients '
                                     'not finite')
            grads[dtype] = flat
            results[f'{conv_type}_{dtype}_loss'] = loss.item()
        for dtype in ('fp16', 'bf16'):
            cos = F.cosine_similarity(grads[dtype], grads['fp32'], dim=0).item()
            results[f'{conv_type}_{dtype}_grad_cosine'] = cos
            if not cos > 0.99:
                raise AssertionError(f'{conv_type} {dtype}: gradient cosine similarity {cos:.4f} '
                                     'to float32, below 0.99')
    return results


def step_kernel_times(args, log) -> Dict:
    import torch

    from analysis_tools.gpu_roofline import GPUS, layer_bounds
    from mmdwnet.ops import triton_idwconv
    rows = {}
    for channels, size in zip((96, 192, 384, 768), (56, 28, 14, 7)):
        x = torch.randn(128, channels, size, size, device='cuda', dtype=torch.bfloat16)
        w = torch.randn(128, 32, 7, 7, size, size, device='cuda', dtype=torch.bfloat16)
        bounds = layer_bounds(channels, size, 128, 'bf16', GPUS['H100'])
        for name, fn in (('forward', lambda: triton_idwconv.forward(x, w)),
                         ('grad_input', lambda: triton_idwconv.grad_input(x, w)),
                         ('grad_weight',
                          lambda: triton_idwconv.weight_grad(x, x, 32, 7))):
            fn()  # compile
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
            for _ in range(10):
                fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 10
            bound = bounds[f'idwconv_{name}']['bound_ms']
            rows[f'stage{size}_{name}'] = dict(ms=ms, bound_ms=bound, of_bound=ms / bound)
            log(f'{channels}x{size}x{size} {name}: {ms:.3f} ms, bound {bound:.3f} ms, '
                f'{ms / bound:.2f}x')
    return dict(kernels=rows, device=torch.cuda.get_device_name(0))


def step_benchmark(args, log) -> Dict:
    out = {}
    for dtype in ('fp32', 'fp16', 'bf16'):
        path = osp.join(args.out, f'benchmark_{dtype}.json')
        _run([sys.executable, 'tools/benchmark.py', 'dwconv_t', 'ddwconv_t', 'iddwconv_t',
              'swin_t', 'convnext_t', '--device', 'cuda', '--batch-size', '64', '--dtype',
              dtype, '--repeats', '3', '--warmup', '1', '--json', path], log, timeout=400)
        with open(path) as f:
            out[dtype] = json.load(f)
    return out


def step_train(task: str):

    def step(args, log) -> Dict:
        from mmdwnet.testing import make_datasets, smoke_run_options
        data_root = osp.join(args.out, 'data')
        if not osp.isdir(data_root):
            make_datasets(data_root, num_train=4, num_val=2)
        work_dir = osp.join(args.out, task)
        options = smoke_run_options(task, data_root)
        config = TASK_CONFIGS[task]
        _run(['bash', 'tools/dist_train.sh', config, '1', '--work-dir', work_dir,
              '--cfg-options', *options], log, timeout=600)
        checkpoint = sorted(glob.glob(osp.join(work_dir, '*.pth')), key=osp.getmtime)[-1]
        output = _run(['bash', 'tools/dist_test.sh', config, checkpoint, '1', '--work-dir',
                       work_dir, '--cfg-options', *options], log, timeout=300)
        return dict(checkpoint=checkpoint, test_log=output.strip().splitlines()[-3:])

    return step


STEPS = {
    'cuda_tests': step_cuda_tests,
    'triton_vs_reference': step_triton_vs_reference,
    'amp_training_step': step_amp_training_step,
    'kernel_times': step_kernel_times,
    'benchmark': step_benchmark,
    'train_mmdet': step_train('mmdet'),
    'train_mmseg': step_train('mmseg'),
    'train_mmpretrain': step_train('mmpretrain'),
}


def run_steps(steps: Dict[str, Callable], args, log=print) -> List[Dict]:
    """Run every step; one result each (``ok``, ``seconds``, ``result`` or ``error``)."""
    results = []
    for name, step in steps.items():
        log(f'== {name}')
        start = time.perf_counter()
        try:
            result = dict(name=name, ok=True, result=step(args, log))
        except Exception as e:  # a failing step is reported, the others still run
            result = dict(name=name, ok=False, error=f'{type(e).__name__}: {e}',
                          traceback=traceback.format_exc()[-3000:])
        result['seconds'] = round(time.perf_counter() - start, 1)
        log(f"== {name}: {'ok' if result['ok'] else 'FAILED ' + result['error'][:500]} "
            f"({result['seconds']} s)")
        results.append(result)
    return results


def write_report(results: List[Dict], out: str, device: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(osp.join(out, 'report.json'), 'w') as f:
        json.dump(dict(device=device, host=platform.node(), steps=results), f, indent=2,
                  default=str)
    lines = [f'# GPU check on {device}', '', '| step | result | seconds |', '|---|---|---:|']
    for r in results:
        lines.append(f"| {r['name']} | {'ok' if r['ok'] else 'FAILED: ' + r['error'][:200]} "
                     f"| {r['seconds']} |")
    kernels = next((r['result']['kernels'] for r in results
                    if r['name'] == 'kernel_times' and r['ok']), None)
    if kernels:
        lines += ['', '| kernel at stage map | measured (ms) | predicted bound (ms) | of bound |',
                  '|---|---:|---:|---:|']
        lines += [f"| {name} | {k['ms']:.3f} | {k['bound_ms']:.3f} | {k['of_bound']:.2f}x |"
                  for name, k in kernels.items()]
    with open(osp.join(out, 'report.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=osp.join(ROOT, 'work_dirs', 'gpu_check'))
    parser.add_argument('--steps', nargs='+', choices=list(STEPS), default=list(STEPS))
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print(f'gpu_check: no CUDA GPU visible to torch {torch.__version__}', file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0)
    print(f'gpu_check: {device}, torch {torch.__version__}', flush=True)
    os.makedirs(args.out, exist_ok=True)
    results = run_steps({name: STEPS[name] for name in args.steps}, args,
                        log=lambda line: print(line, flush=True))
    write_report(results, args.out, device)
    print(f"gpu_check: report in {osp.join(args.out, 'report.md')}")
    return 0 if all(r['ok'] for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
