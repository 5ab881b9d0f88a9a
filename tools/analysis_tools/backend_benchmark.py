"""Inference throughput of the same classifiers under PyTorch eager, ``torch.compile``
(inductor) and ONNX Runtime (CPU execution provider), at batch 1 and a larger batch.

Every model is prepared once as it would be deployed (BatchNorms folded where the backbone
can, :func:`mmdwnet.apis.export.prepare_for_export`); the compiled and ONNX versions are
built per batch size with static shapes (what a deployment with a fixed input does), and
each is checked against eager on the timed batch before it is timed. All (model, backend)
pairs are timed interleaved, repeat by repeat, with the same threads.
"""
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from analysis_tools.benchmark_utils import BASELINE, build_classifier
from analysis_tools.markdown import markdown_table

BACKENDS = ('eager', 'compile', 'onnxruntime')
#: largest tolerated difference from eager, relative to the logits' scale (inductor and ONNX
#: Runtime reorder the float32 sums)
AGREEMENT = 1e-3


class _TorchRunner:
    """``fn`` (the model, or the model compiled) in inference mode."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.fn(x)


def _onnx_runner(model: nn.Module, example: torch.Tensor, threads: int):
    from mmdwnet.apis.export import _export_onnx, _load_onnx
    fd, path = tempfile.mkstemp(suffix='.onnx')
    os.close(fd)
    try:
        _export_onnx(model, example, path, dynamic=False, opset=17)
        run = _load_onnx(path, threads)
    finally:
        os.remove(path)
    return lambda x: run(x)[0]


def _make_runner(backend: str, model: nn.Module, example: torch.Tensor, threads: int):
    if backend == 'eager':
        return _TorchRunner(model)
    if backend == 'compile':
        run = _TorchRunner(torch.compile(model, dynamic=False))
        run(example)  # compile now, not in the first timed repeat
        return run
    return _onnx_runner(model, example, threads)


def measure_backends(names: Sequence[str], backends: Sequence[str] = BACKENDS,
                     batch_sizes: Sequence[int] = (1, 16), img_size: int = 224,
                     repeats: int = 5, warmup: int = 2,
                     progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """One row per (model, backend): ``img_per_s`` at each batch size (a dict keyed by
    batch size), the batch-1 ``latency_ms``, and ``max_rel_diff`` from eager."""
    from mmdwnet.apis.export import prepare_for_export
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise ValueError(f'backends {unknown} are not among {BACKENDS}')
    threads = torch.get_num_threads()
    say = progress or (lambda msg: None)
    runners = {}
    for name in names:
        say(f'building {name}')
        torch.manual_seed(0)
        model = prepare_for_export(build_classifier(name), 'mmpretrain', progress=say)
        for batch in batch_sizes:
            x = torch.randn(batch, 3, img_size, img_size,
                            generator=torch.Generator().manual_seed(batch))
            with torch.inference_mode():
                reference = model(x)
            for backend in backends:
                say(f'{name}: preparing {backend} at batch {batch}')
                start = time.perf_counter()
                run = _make_runner(backend, model, x, threads)
                diff = ((run(x) - reference).abs().max() / reference.abs().max()).item()
                if diff > AGREEMENT:
                    raise RuntimeError(f'{name} under {backend} differs from eager by {diff:.2e} '
                                       f'of the logit scale (tolerated {AGREEMENT})')
                say(f'{name}: {backend} at batch {batch} ready in '
                    f'{time.perf_counter() - start:.1f} s, {diff:.1e} from eager')
                runners[name, backend, batch] = (run, x, diff)
    times = {key: [] for key in runners}
    # torch.utils.benchmark times one statement at a time: the pairs here alternate per repeat
    for i in range(warmup + repeats):
        for key, (run, x, _) in runners.items():
            start = time.perf_counter()
            run(x)
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
        say(f'repeat {i + 1 - warmup}/{repeats}' if i >= warmup else f'warm-up {i + 1}')
    rows = []
    for name in names:
        for backend in backends:
            rate = {b: b / statistics.median(times[name, backend, b]) for b in batch_sizes}
            row = dict(model=name, backend=backend, img_per_s=rate,
                       max_rel_diff=max(runners[name, backend, b][2] for b in batch_sizes))
            if 1 in batch_sizes:
                row['latency_ms'] = statistics.median(times[name, backend, 1]) * 1e3
            rows.append(row)
    return rows


def format_backend_table(rows: List[Dict], batch_sizes: Sequence[int] = (1, 16)) -> str:
    """Markdown: per model and backend, batch-1 latency, throughput per batch size and the
    speed-up over the same model in eager PyTorch at the largest batch."""
    eager = {r['model']: r for r in rows if r['backend'] == 'eager'}
    largest = max(batch_sizes)
    header = ['model', 'backend']
    if 1 in batch_sizes:
        header.append('batch 1 latency (ms)')
    header += [f'batch {b} (img/s)' for b in batch_sizes]
    header += [f'vs eager (batch {b})' for b in sorted({1, largest} & set(batch_sizes))]
    body = []
    for r in rows:
        line = [r['model'], r['backend']]
        if 1 in batch_sizes:
            line.append(f"{r['latency_ms']:.1f}")
        line += [f"{r['img_per_s'][b]:.1f}" for b in batch_sizes]
        base = eager.get(r['model'])
        for b in sorted({1, largest} & set(batch_sizes)):
            line.append(f"{r['img_per_s'][b] / base['img_per_s'][b]:.2f}x" if base else '-')
        body.append(line)
    align = ['left', 'left'] + ['right'] * (len(header) - 2)
    return '\n'.join(markdown_table(header, body, align))


__all__ = ['BACKENDS', 'BASELINE', 'measure_backends', 'format_backend_table']
