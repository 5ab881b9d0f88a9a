"""Forward + backward time and peak memory of the I-D-DW operator against the usual unfold
implementation, at DWNet's stage-1 shape (default B=8, C=96, G=32, 56x56, K=7), in float32,
and of the operator in bfloat16 (float32 sums) against its own float32.

Times are medians of interleaved repeats in this process; peak memory is measured as by
tools/benchmark.py (analysis_tools.memory.peak_memory_mb) over one forward + backward,
each implementation on CPU in a process that has run nothing before (a child of a copy of
the tool taken before any torch operation ran).

Example:
    python tools/benchmark_op.py --json work_dirs/op.json
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

from analysis_tools.benchmark_utils import machine_description
from analysis_tools.clean_process import CleanProcess
from analysis_tools.malloc import retain_freed_memory
from analysis_tools.markdown import markdown_table, replace_section, section_markers
from analysis_tools.memory import peak_memory_mb
from mmdwnet.ops import inhomogeneous_dwconv2d
# The unfold implementation (the portable rewrite of the reference's CUDA kernel: unfold
# the K x K neighbourhoods, a K*K-times larger tensor, and weight them) is the tests' own
# reference of the operator, mmdwnet/testing/reference.py: one copy, measured here.
from mmdwnet.testing.reference import idwconv as unfold_reference

# name -> (implementation, dtype of its operands); bf16 sums run in float32
IMPLS = {
    'mmdwnet': (inhomogeneous_dwconv2d, torch.float32),
    'unfold': (unfold_reference, torch.float32),
    'mmdwnet-bf16': (inhomogeneous_dwconv2d, torch.bfloat16),
}
README_START, README_END = section_markers('benchmark-op', 'tools/benchmark_op.py --readme')


def make_inputs(args, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, args.channels, args.size, args.size, generator=gen)
    w = torch.randn(args.batch_size, args.groups, args.kernel_size, args.kernel_size,
                    args.size, args.size, generator=gen)
    return x.to(device, dtype).requires_grad_(), w.to(device, dtype).requires_grad_()


def step(fn, x, w, device):
    y = fn(x, w)
    y.backward(torch.ones_like(y))
    x.grad = w.grad = None
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def peak_here(impl, args) -> float:
    """Peak MiB above the inputs during one forward + backward, in this process."""
    fn, dtype = IMPLS[impl]
    x, w = make_inputs(args, args.device, dtype)
    step(fn, x[:1, :, :8, :8].detach().requires_grad_(),
         w[:1, :, :, :, :8, :8].detach().requires_grad_(), args.device)  # warm-up
    return peak_memory_mb(lambda: step(fn, x, w, args.device), args.device)


def peak_memory(impl, args, clean) -> float:
    """:func:`peak_here` on CUDA in this process; on CPU in a child of ``clean``, a process
    that has run nothing before."""
    if args.device.startswith('cuda'):
        return peak_here(impl, args)
    return clean.call(peak_here, impl, args, what=f'memory measurement of {impl}')


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
    parser.add_argument('--malloc', default='retain', choices=['retain', 'default'],
                        help="CPU: 'retain' keeps freed memory in glibc's malloc, as "
                        "tools/benchmark.py does (no page faults on the reused (B, G, K, K, "
                        "H, W) kernel gradients); 'default' leaves glibc as it is")
    parser.add_argument('--json', help='write the results to this JSON file')
    parser.add_argument('--readme', help='write the table into this README between the '
                        f'lines {README_START!r} and {README_END!r}')
    args = parser.parse_args(argv)
    if args.channels % args.groups:
        parser.error(f'--groups ({args.groups}) must divide --channels ({args.channels})')
    return args


def main():
    argv = sys.argv[1:]
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # peak memory on CPU: each implementation in a child of a copy of this process taken
    # now, before any torch operation ran (no import in every measurement)
    clean = CleanProcess() if args.device == 'cpu' else None
    try:
        run(args, argv, clean)
    finally:
        if clean is not None:
            clean.close()


def run(args, argv, clean):
    malloc = 'default'
    if args.device == 'cpu' and args.malloc == 'retain' and retain_freed_memory():
        malloc = 'retain'  # the timings only: peak memory is measured in clean processes
    inputs = {name: make_inputs(args, args.device, dtype) for name, (_, dtype) in IMPLS.items()}
    times = {name: [] for name in IMPLS}
    for name, (fn, _) in IMPLS.items():
        step(fn, *inputs[name], args.device)  # warm-up
    # torch.utils.benchmark times one statement at a time: the implementations alternate per repeat
    for i in range(args.repeats):
        for name, (fn, _) in IMPLS.items():
            start = time.perf_counter()
            step(fn, *inputs[name], args.device)
            times[name].append(time.perf_counter() - start)
        print(f'repeat {i + 1}/{args.repeats}: ' + ', '.join(
            f'{n} {t[-1] * 1e3:.1f} ms' for n, t in times.items()), file=sys.stderr, flush=True)
    rows = {name: dict(fwd_bwd_ms=statistics.median(t) * 1e3,
                       peak_mem_mb=peak_memory(name, args, clean))
            for name, t in times.items()}
    ours, ref, low = rows['mmdwnet'], rows['unfold'], rows['mmdwnet-bf16']
    summary = dict(speedup=ref['fwd_bwd_ms'] / ours['fwd_bwd_ms'],
                   memory_fraction=ours['peak_mem_mb'] / ref['peak_mem_mb'],
                   bf16_speedup=ours['fwd_bwd_ms'] / low['fwd_bwd_ms'])
    lines = [
        f'I-D-DW forward + backward, B={args.batch_size} C={args.channels} G={args.groups} '
        f'{args.size}x{args.size} K={args.kernel_size}, {args.device}, {args.threads} threads '
        f'({machine_description(args.device)}), glibc malloc {malloc}:', '',
        *markdown_table(['implementation', 'fwd+bwd (ms)', 'peak memory (MiB)'],
                        [(name, f"{r['fwd_bwd_ms']:.1f}", f"{r['peak_mem_mb']:.0f}")
                         for name, r in rows.items()], ['left', 'right', 'right'])
    ]
    lines += ['', f"mmdwnet vs unfold (float32): {summary['speedup']:.1f}x faster, "
              f"{summary['memory_fraction']:.3f} of its peak memory; mmdwnet in bfloat16 "
              f"(float32 sums): {summary['bf16_speedup']:.2f}x its float32 speed."]
    print('\n'.join(lines))
    if args.readme:
        command = 'python tools/benchmark_op.py ' + ' '.join(argv)
        replace_section(args.readme, f'Measured with `{command}`. ' + '\n'.join(lines),
                        README_START, README_END)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(rows=rows, **summary, malloc=malloc, setting=vars(args)), f, indent=2)


if __name__ == '__main__':
    main()
