"""Forward + backward time and peak memory of the I-D-DW operator against the usual unfold
implementation, at DWNet's stage-1 shape (default B=8, C=96, G=32, 56x56, K=7).

Times are medians of interleaved repeats in this process; peak memory is the growth of the
resident set (CPU) or the allocator's peak (CUDA) over one forward + backward, each
implementation in a fresh process on CPU.

Example:
    python tools/benchmark_op.py --json work_dirs/op.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from mmdwnet.ops import inhomogeneous_dwconv2d


def unfold_reference(x, weight):
    """The portable rewrite of the reference's CUDA kernel: unfold the K x K neighbourhoods
    (a K*K-times larger tensor) and weight them."""
    b, c, h, w = x.shape
    groups, k = weight.shape[1], weight.shape[2]
    cols = F.unfold(x, k, padding=k // 2).view(b, groups, c // groups, k, k, h, w)
    return (cols * weight.unsqueeze(2)).sum(dim=(3, 4)).view(b, c, h, w)


IMPLS = {'mmdwnet': inhomogeneous_dwconv2d, 'unfold': unfold_reference}


def make_inputs(args, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, args.channels, args.size, args.size, generator=gen)
    w = torch.randn(args.batch_size, args.groups, args.kernel_size, args.kernel_size,
                    args.size, args.size, generator=gen)
    return x.to(device).requires_grad_(), w.to(device).requires_grad_()


def step(fn, x, w, device):
    y = fn(x, w)
    y.backward(torch.ones_like(y))
    x.grad = w.grad = None
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def peak_here(impl, args) -> float:
    """Peak MiB above the inputs during one forward + backward, in this process."""
    x, w = make_inputs(args, args.device)
    fn = IMPLS[impl]
    step(fn, x[:1, :, :8, :8].detach().requires_grad_(),
         w[:1, :, :, :, :8, :8].detach().requires_grad_(), args.device)  # warm-up
    if args.device.startswith('cuda'):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(fn, x, w, args.device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open('/proc/self/status') as f:
        base = int(next(line for line in f if line.startswith('VmRSS:')).split()[1])
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    step(fn, x, w, args.device)
    with open('/proc/self/status') as f:
        peak = int(next(line for line in f if line.startswith('VmHWM:')).split()[1])
    return (peak - base) / 1024


def peak_memory(impl, args) -> float:
    if args.device.startswith('cuda'):
        return peak_here(impl, args)
    # a fixed mmap threshold: freed blocks go back to the system at once, so the resident
    # set follows the live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')
    out = subprocess.run([sys.executable, __file__, '--peak-of', impl, *sys.argv[1:]],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--channels', type=int, default=96)
    parser.add_argument('--groups', type=int, default=32)
    parser.add_argument('--size', type=int, default=56, help='height = width')
    parser.add_argument('--kernel-size', type=int, default=7)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--json', help='write the results to this JSON file')
    parser.add_argument('--peak-of', choices=list(IMPLS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.channels % args.groups:
        parser.error(f'--groups ({args.groups}) must divide --channels ({args.channels})')
    return args


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_of:
        print(peak_here(args.peak_of, args))
        return
    x, w = make_inputs(args, args.device)
    times = {name: [] for name in IMPLS}
    for name, fn in IMPLS.items():
        step(fn, x, w, args.device)  # warm-up
    for i in range(args.repeats):
        for name, fn in IMPLS.items():
            start = time.perf_counter()
            step(fn, x, w, args.device)
            times[name].append(time.perf_counter() - start)
        print(f'repeat {i + 1}/{args.repeats}: ' + ', '.join(
            f'{n} {t[-1] * 1e3:.1f} ms' for n, t in times.items()), file=sys.stderr, flush=True)
    rows = {name: dict(fwd_bwd_ms=statistics.median(t) * 1e3,
                       peak_mem_mb=peak_memory(name, args)) for name, t in times.items()}
    ours, ref = rows['mmdwnet'], rows['unfold']
    print(f'I-D-DW forward + backward, B={args.batch_size} C={args.channels} G={args.groups} '
          f'{args.size}x{args.size} K={args.kernel_size}, {args.device}, '
          f'{args.threads} threads')
    print('| implementation | fwd+bwd (ms) | peak memory (MiB) |\n|---|---:|---:|')
    for name, r in rows.items():
        print(f"| {name} | {r['fwd_bwd_ms']:.1f} | {r['peak_mem_mb']:.0f} |")
    summary = dict(speedup=ref['fwd_bwd_ms'] / ours['fwd_bwd_ms'],
                   memory_fraction=ours['peak_mem_mb'] / ref['peak_mem_mb'])
    print(f"mmdwnet vs unfold: {summary['speedup']:.1f}x faster, "
          f"{summary['memory_fraction']:.3f} of its peak memory")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(rows=rows, **summary, setting=vars(args)), f, indent=2)


if __name__ == '__main__':
    main()
