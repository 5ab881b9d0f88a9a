"""Inference throughput, training-step time and peak memory, side by side.

DWNet classifiers against MMPretrain's own Swin-T and ConvNeXt-T (1000-class heads), in one
process, same input and threads, interleaved repeat by repeat: throughput at the batch size,
latency of one image (as deployment runs), and the achieved GFLOP/s (2 FLOPs per
multiply-accumulate counted as by ``tools/get_flops.py``) as a fraction of the machine's
matrix-product peak in the same dtype, which the tool measures in the same run, once after
each repeat of the models (the median is the reference). The header
names the CPU and its relevant instruction sets (AVX-512, AVX-512 BF16/FP16, AMX).
Beside the peak's bound, usually a tighter one: each model's matrix products (recorded
from one inference, in the dtype they run in) timed alone in every repeat by the fastest
library, the throughput it would have if nothing else took time (the "products alone"
columns; :mod:`analysis_tools.matrix_products` says what it assumes): a target above it
cannot be reached on the machine by any work outside the products.
``--dtype bf16`` / ``fp16`` run everything under ``torch.autocast`` on the device.
Inference uses the models' deploy form (BatchNorms folded, ``switch_to_deploy``) unless
``--no-fuse``; a training step is forward + cross-entropy + backward + AdamW step (torch's
fused AdamW, for every model) in train mode.

On CPU, glibc's malloc is set to keep freed memory for reuse (``--malloc retain``, the
default; see :func:`analysis_tools.malloc.retain_freed_memory`), as PyTorch's CPU launcher
does with tcmalloc or jemalloc; otherwise every step pays page faults on its large
activations, which add noise of up to half a second per step. ``--malloc default`` keeps
glibc's defaults. Peak memory is measured in separate processes either way, children of a
copy of the tool taken before any model ran.

``--compile`` and ``--backend onnxruntime`` (CPU, fp32) compare instead how the same models
run deployed: PyTorch eager, ``torch.compile`` (inductor) and ONNX Runtime, at batch 1 and
the batch size, each checked against eager first (:mod:`analysis_tools.backend_benchmark`).

Example:
    python tools/benchmark.py dwconv_t ddwconv_t iddwconv_t swin_t convnext_t \\
        --json work_dirs/benchmark.json --plot work_dirs/benchmark.png
    python tools/benchmark.py dwconv_t ddwconv_t iddwconv_t swin_t convnext_t \\
        --compile --backend onnxruntime
"""
import argparse
import os
import os.path as osp
import statistics
import sys

import torch

import mmdwnet  # noqa: F401  (registers DWNet)
from analysis_tools.benchmark_utils import (DTYPES, MODELS, add_efficiency, add_ratios,
                                            format_table, is_native, isa_summary,
                                            machine_description, matmul_peak_gflops, measure_speed,
                                            plot)
from analysis_tools.clean_process import CleanProcess
from analysis_tools.malloc import retain_freed_memory
from analysis_tools.markdown import replace_section, section_markers
from analysis_tools.memory import measure_memory


def readme_markers(dtype: str, backends: bool = False):
    """The lines around the tool's section of a page: one section per dtype, and one for
    the backend comparison."""
    tag = 'benchmark' if dtype == 'fp32' else f'benchmark-{dtype}'
    return section_markers('benchmark-backends' if backends else tag,
                           'tools/benchmark.py --readme')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='+', metavar='MODEL',
                        help=f'any of: {" ".join(MODELS)}')
    parser.add_argument('--device', default='cpu', help='cpu or cuda[:N] (default: cpu)')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--dtype', default='fp32', choices=list(DTYPES),
                        help='fp16/bf16 run under torch.autocast on the device (CPU or CUDA)')
    parser.add_argument('--threads', type=int, default=os.cpu_count(),
                        help='CPU threads (default: all cores)')
    parser.add_argument('--repeats', type=int, default=5,
                        help='timed repeats per model; the median is reported')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--malloc', default='retain', choices=['retain', 'default'],
                        help="CPU: 'retain' keeps freed memory in glibc's malloc (no page "
                        "faults on reused activations); 'default' leaves glibc as it is")
    parser.add_argument('--no-fuse', action='store_true',
                        help='time inference without folding BatchNorms')
    parser.add_argument('--no-train', action='store_true', help='skip the training step')
    parser.add_argument('--no-memory', action='store_true', help='skip peak memory')
    parser.add_argument('--compile', action='store_true',
                        help='compare torch.compile (inductor) with eager, batch 1 and '
                        '--batch-size (inference, CPU fp32)')
    parser.add_argument('--backend', action='append', default=[], choices=['onnxruntime'],
                        help='compare ONNX Runtime with eager, batch 1 and --batch-size')
    parser.add_argument('--json', help='write the rows to this JSON file')
    parser.add_argument('--plot', help='write a throughput-vs-parameters chart (PNG)')
    parser.add_argument('--readme', help='write the table into this README between the '
                        'lines %r and %r (fp32; bf16/fp16: benchmark-DTYPE; with '
                        '--compile/--backend: benchmark-backends)' % readme_markers('fp32'))
    return parser.parse_args()


def check_args(args) -> None:
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        sys.exit(f'error: unknown model(s) {unknown}; MODEL must be one of {list(MODELS)}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        sys.exit(f'error: --device {args.device} but CUDA is not available here')
    if not args.device.startswith(('cpu', 'cuda')):
        sys.exit(f'error: --device must be cpu or cuda[:N], got {args.device!r}')
    for name in ('batch_size', 'img_size', 'threads', 'repeats'):
        if getattr(args, name) < 1:
            sys.exit(f'error: --{name.replace("_", "-")} must be >= 1, '
                     f'got {getattr(args, name)}')
    if args.img_size % 32:
        sys.exit(f'error: --img-size must be a multiple of 32, got {args.img_size}')
    if (args.compile or args.backend) and (args.device != 'cpu' or args.dtype != 'fp32'):
        sys.exit('error: --compile and --backend compare CPU fp32 inference; got '
                 f'--device {args.device} --dtype {args.dtype}')


def main():
    args = parse_args()
    check_args(args)
    torch.set_num_threads(args.threads)
    # peak memory on CPU: each model in a child of a copy of this process taken now,
    # before any model or torch operation ran (no import in every measurement)
    clean = None
    if args.device == 'cpu' and not args.no_memory and not (args.compile or args.backend):
        clean = CleanProcess()
    try:
        run(args, clean)
    finally:
        if clean is not None:
            clean.close()


def run(args, clean):

    def progress(msg):
        print(msg, file=sys.stderr, flush=True)

    malloc = 'default'
    if args.device == 'cpu' and args.malloc == 'retain':
        if retain_freed_memory():
            malloc = 'retain'
        else:
            progress('note: the C library is not glibc; --malloc retain has no effect')
    if args.compile or args.backend:
        return compare_backends(args, progress)
    fuse = not args.no_fuse
    # the peak is measured after every repeat, interleaved with the models, and its median
    # is the reference: on a shared host whose speed drifts (seen here: the same products
    # 165 to 245 GFLOP/s within minutes), a peak taken once before and after the models, or
    # the best of several, would be measured at other moments than the models' medians
    peaks = []

    def measure_peak():
        peaks.append(matmul_peak_gflops(args.dtype, args.device))
        progress(f'matrix-product peak in {args.dtype}: {peaks[-1]:.0f} GFLOP/s')

    rows = measure_speed(args.models, args.device, args.batch_size, args.img_size, args.dtype,
                         args.repeats, args.warmup, fuse, not args.no_train, progress,
                         after_each_repeat=measure_peak)
    peak = statistics.median(peaks)
    add_efficiency(rows, peak)
    if not args.no_memory:
        for row in rows:
            progress(f'peak memory of {row["model"]}')
            row.update(measure_memory(row['model'], args.device, args.batch_size,
                                      args.img_size, args.dtype, fuse, clean))
    add_ratios(rows)
    cpu = args.device == 'cpu'
    setting = dict(device=args.device, machine=machine_description(args.device),
                   isa=isa_summary() if cpu else None,
                   native_dtype=is_native(args.dtype) if cpu else None,
                   batch_size=args.batch_size, img_size=args.img_size, dtype=args.dtype,
                   threads=args.threads, torch=torch.__version__, malloc=malloc,
                   peak_gflops_measured=peaks)
    for row in rows:
        row.update(setting)
    header = setting['machine']
    if cpu:
        header += f" ({setting['isa']})"
        if not setting['native_dtype']:
            header += f'; no native {args.dtype} on this CPU (emulated)'
    header += (f"; batch {args.batch_size} (latency: batch 1), {args.img_size}x{args.img_size}, "
               f"{args.dtype}{' (autocast)' if args.dtype != 'fp32' else ''}, torch "
               f'{torch.__version__}, median of {args.repeats} interleaved repeats; '
               f'{args.dtype} matrix-product peak {peak:.0f} GFLOP/s, measured in this run '
               f'(median of {len(peaks)}, one after each repeat; {min(peaks):.0f} to '
               f'{max(peaks):.0f})')
    if malloc == 'retain':
        header += '; glibc malloc keeping freed memory (--malloc retain)'
    table = format_table(rows)
    report(args, header, table, rows, readme_markers(args.dtype), 'benchmark')
    if args.plot:
        os.makedirs(osp.dirname(osp.abspath(args.plot)), exist_ok=True)
        plot(rows, args.plot, header)


def report(args, header, table, rows, markers, section):
    """Print the table; write ``--json`` and the ``--readme`` section between
    ``markers``."""
    print(header)
    print(table)
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        import json
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)
    if args.readme:
        command = 'python tools/benchmark.py ' + ' '.join(sys.argv[1:])
        body = '\n'.join([f'Measured with `{command}` on {header}:', '', table])
        replace_section(args.readme, body, *markers)
        print(f'{args.readme}: {section} section updated')


def compare_backends(args, progress):
    from analysis_tools.backend_benchmark import format_backend_table, measure_backends
    backends = ['eager'] + (['compile'] if args.compile else []) + args.backend
    batches = sorted({1, args.batch_size})
    rows = measure_backends(args.models, backends, batches, args.img_size, args.repeats,
                            args.warmup, progress)
    header = (f"{machine_description('cpu')} ({isa_summary()}); {args.img_size}x"
              f"{args.img_size}, fp32, {args.threads} threads, torch {torch.__version__}, "
              f"BatchNorms folded; median of {args.repeats} interleaved repeats")
    table = format_backend_table(rows, batches)
    report(args, header, table, rows, readme_markers(args.dtype, backends=True), 'backend')


if __name__ == '__main__':
    main()
