"""Compile every Triton kernel specialisation a DWNet config uses for NVIDIA GPUs, on any
machine: no GPU or driver is needed (``triton.compile`` with a ``GPUTarget``; Triton ships
``ptxas``).

The specialisations come from the shipped configs: every I-D-DW layer of every ``iddw``
config (ImageNet, detection, segmentation, ablations) gives its kernel size K and channels
per group; each (K, channels per group) is compiled for the forward pass, the input
gradient and the kernel gradient, in float32, float16 and bfloat16, for each ``--arch``.
One line per specialisation::

    kernel=_forward_kernel arch=sm_90 dtype=fp16 CPG=32 K=7 TRANSPOSED=False BLOCK_C=32
    BLOCK_P=64 compile_s=2.1 ptx_lines=812 regs=72 spills=0

(registers and spilled bytes from ``ptxas -v``). Compiled kernels land in Triton's cache
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``), so a second run is fast; ``--fresh``
compiles into a new empty cache to time the compiler; ``--markdown PAGE`` writes a summary
per kernel, architecture and dtype into PAGE's generated section (docs/benchmarks.md).
Exit status 1 where a specialisation takes longer than ``--max-seconds`` or spills
registers on an ``--no-spill-arch``.

Example:
    python tools/gpu_compile_check.py --arch 80 90
    python tools/gpu_compile_check.py --kernel-size 7 --cpg 32 --dtype fp16 --arch 90
    python tools/gpu_compile_check.py --fresh --markdown docs/benchmarks.md
"""
import argparse
import glob
import os
import os.path as osp
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Sequence, Tuple

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DTYPES = ('fp32', 'fp16', 'bf16')  # Triton's pointer element types


def config_specialisations(root: str = ROOT) -> List[Tuple[int, int]]:
    """``(K, channels per group)`` of every I-D-DW layer in the shipped ``iddw`` configs."""
    from mmengine.config import Config

    import mmdwnet  # noqa: F401  (registers DWNet)
    from mmdwnet.models.backbones import DWNet
    from mmdwnet.models.utils import InhomogeneousDynamicDWConv
    found = set()
    paths = sorted(glob.glob(osp.join(root, 'configs', '**', '*iddw*.py'), recursive=True))
    for path in paths:
        backbone = dict(Config.fromfile(path).model['backbone'])
        backbone.pop('type')
        backbone.pop('init_cfg', None)
        for module in DWNet(**backbone).modules():
            if isinstance(module, InhomogeneousDynamicDWConv):
                channels = module.conv1.in_channels
                found.add((module.kernel_size, channels // module.groups))
    return sorted(found)


def _ptxas() -> str:
    import triton
    path = osp.join(osp.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')
    if not osp.exists(path):
        raise FileNotFoundError(f'no ptxas in the Triton installation ({path})')
    return path


def registers_and_spills(ptx: str, arch: int) -> Tuple[int, int]:
    """Registers per thread and spilled bytes (stores + loads) of the PTX ``ptx`` for
    ``sm_<arch>``, as ``ptxas -v`` reports them."""
    with tempfile.TemporaryDirectory() as tmp:
        src = osp.join(tmp, 'kernel.ptx')
        with open(src, 'w') as f:
            f.write(ptx)
        arch_name = f'sm_{arch}a' if arch == 90 else f'sm_{arch}'
        result = subprocess.run([_ptxas(), '-v', f'--gpu-name={arch_name}', src, '-o',
                                 osp.join(tmp, 'kernel.cubin')],
                                capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f'ptxas failed: {result.stderr[-2000:]}')
    regs = re.search(r'Used (\d+) registers', result.stderr)
    spills = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', result.stderr)
    return (int(regs.group(1)) if regs else 0,
            int(spills.group(1)) + int(spills.group(2)) if spills else 0)


def specialisations(shapes: Iterable[Tuple[int, int]], dtypes: Sequence[str],
                    archs: Sequence[int]) -> List[Dict]:
    """Every (kernel, arch, dtype, constexprs) to compile for ``shapes``."""
    from mmdwnet.ops.triton_idwconv import block_sizes
    out = []
    for k, cpg in shapes:
        block_c, block_p = block_sizes(cpg)
        for arch in archs:
            for dtype in dtypes:
                for transposed in (False, True):
                    out.append(dict(kernel='_forward_kernel', arch=arch, dtype=dtype,
                                    constexprs=dict(CPG=cpg, K=k, TRANSPOSED=transposed,
                                                    BLOCK_C=block_c, BLOCK_P=block_p)))
                out.append(dict(kernel='_weight_grad_kernel', arch=arch, dtype=dtype,
                                constexprs=dict(CPG=cpg, K=k, BLOCK_C=block_c,
                                                BLOCK_P=block_p)))
    return out


def compile_one(spec: Dict) -> Dict:
    """Compile one specialisation; its line's fields."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mmdwnet.ops import triton_idwconv
    fn = getattr(triton_idwconv, spec['kernel'])
    pointer = f'*{spec["dtype"]}'
    signature = {}
    for name in fn.arg_names:
        if name in spec['constexprs']:
            signature[name] = 'constexpr'
        elif name.endswith('_ptr'):
            signature[name] = pointer
        else:
            signature[name] = 'i32'
    source = ASTSource(fn=fn, signature=signature, constexprs=spec['constexprs'])
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget('cuda', spec['arch'], 32))
    seconds = time.perf_counter() - start
    ptx = compiled.asm['ptx']
    regs, spills = registers_and_spills(ptx, spec['arch'])
    return dict(spec, compile_s=seconds, ptx_lines=ptx.count('\n'), regs=regs, spills=spills)


def format_line(row: Dict) -> str:
    constexprs = ' '.join(f'{k}={v}' for k, v in row['constexprs'].items())
    return (f"kernel={row['kernel']} arch=sm_{row['arch']} dtype={row['dtype']} {constexprs} "
            f"compile_s={row['compile_s']:.1f} ptx_lines={row['ptx_lines']} "
            f"regs={row['regs']} spills={row['spills']}")


MARKDOWN_TAG = 'gpu-compile-check'
KERNEL_NAMES = {('_forward_kernel', False): 'forward', ('_forward_kernel', True):
                'input gradient', ('_weight_grad_kernel', None): 'kernel gradient'}


def summary_table(rows: Sequence[Dict]) -> List[str]:
    """One Markdown row per (kernel, arch, dtype): how many specialisations, their compile
    seconds (median and largest), and the largest PTX, register count and spill."""
    from analysis_tools.markdown import markdown_table
    groups: Dict[tuple, List[Dict]] = {}
    for row in rows:
        name = KERNEL_NAMES[(row['kernel'], row['constexprs'].get('TRANSPOSED'))]
        groups.setdefault((name, row['arch'], row['dtype']), []).append(row)
    order = {name: i for i, name in enumerate(KERNEL_NAMES.values())}
    body = []
    for (name, arch, dtype), group in sorted(
            groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], DTYPES.index(kv[0][2]))):
        seconds = [r['compile_s'] for r in group]
        body.append((name, f'sm_{arch}', dtype, len(group), f'{statistics.median(seconds):.1f}',
                     f'{max(seconds):.1f}',
                     max(r['ptx_lines'] for r in group), max(r['regs'] for r in group),
                     max(r['spills'] for r in group)))
    return markdown_table(
        ('kernel', 'arch', 'dtype', 'specialisations', 'compile s (median)', 'compile s (max)',
         'PTX lines (max)', 'registers (max)', 'spilled bytes (max)'), body,
        ('left', 'left', 'left') + ('right',) * 6)


def write_markdown(path: str, rows: Sequence[Dict], shapes, fresh: bool) -> None:
    import triton

    from analysis_tools.benchmark_utils import cpu_model
    from analysis_tools.markdown import replace_section, section_markers
    cache = 'an empty Triton cache' if fresh else 'the Triton cache as found'
    lines = [f'Compiled on {cpu_model()} ({os.cpu_count()} cores), Triton {triton.__version__}, '
             f'{cache}; (K, channels per group) {", ".join(f"({k}, {c})" for k, c in shapes)}.',
             ''] + summary_table(rows)
    replace_section(path, '\n'.join(lines),
                    *section_markers(MARKDOWN_TAG, 'tools/gpu_compile_check.py --markdown'))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', type=int, nargs='+', default=[80, 90],
                        help='compute capabilities to compile for (default: 80 90)')
    parser.add_argument('--dtype', nargs='+', default=list(DTYPES), choices=DTYPES)
    parser.add_argument('--kernel-size', type=int, nargs='+',
                        help='only these K (default: those of the configs)')
    parser.add_argument('--cpg', type=int, nargs='+',
                        help='only these channels per group (default: those of the configs)')
    parser.add_argument('--max-seconds', type=float, default=60.,
                        help='fail where one specialisation compiles longer (default 60)')
    parser.add_argument('--no-spill-arch', type=int, nargs='*', default=[90],
                        help='fail where a specialisation spills on these (default: 90)')
    parser.add_argument('--fresh', action='store_true',
                        help='compile into a new empty TRITON_CACHE_DIR (times the compiler)')
    parser.add_argument('--markdown', metavar='PAGE',
                        help='write the summary table into the generated section of PAGE')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fresh:
        os.environ['TRITON_CACHE_DIR'] = tempfile.mkdtemp(prefix='triton-cache-')
    shapes = config_specialisations()
    if args.kernel_size or args.cpg:
        ks = set(args.kernel_size or [k for k, _ in shapes])
        cpgs = set(args.cpg or [c for _, c in shapes])
        shapes = sorted((k, c) for k in ks for c in cpgs)
    print(f'(K, channels per group): {shapes}; cache: '
          f"{os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache')}", flush=True)
    failures, rows = [], []
    for spec in specialisations(shapes, args.dtype, args.arch):
        row = compile_one(spec)
        rows.append(row)
        print(format_line(row), flush=True)
        if row['compile_s'] > args.max_seconds:
            failures.append(f'{format_line(row)}: compiled in more than {args.max_seconds} s')
        if row['spills'] and row['arch'] in args.no_spill_arch:
            failures.append(f'{format_line(row)}: spills registers')
    if args.markdown:
        write_markdown(args.markdown, rows, shapes, args.fresh)
    for failure in failures:
        print(f'FAILED {failure}', file=sys.stderr)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
