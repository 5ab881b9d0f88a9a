"""Side-by-side speed of DWNet classifiers and MMPretrain's Swin-T / ConvNeXt-T, and the
benchmark's table and plot (peak memory is measured by :mod:`analysis_tools.memory`).

All models run in one process on the same input and threads, interleaved repeat by repeat
so that machine noise hits all of them alike.
"""
import platform
import statistics
import textwrap
import time
from collections import Counter
from contextlib import nullcontext
from copy import deepcopy
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmengine.hub import get_config
from torch import nn

from analysis_tools.markdown import markdown_table
from analysis_tools.matrix_products import (Product, product_flops, products_seconds,
                                            record_matrix_products, synchronize, time_product)
from mmdwnet.ops.cpu_extension import cpu_flags
from mmdwnet.utils.build import build_model

# the configs of the installed packages (mmengine.hub.get_config paths)
MODELS = {
    'dwconv_t': 'mmdwnet::mmpretrain/dwconv_t_8xb128_in1k.py',
    'ddwconv_t': 'mmdwnet::mmpretrain/ddwconv_t_8xb128_in1k.py',
    'iddwconv_t': 'mmdwnet::mmpretrain/iddwconv_t_8xb128_in1k.py',
    'dwconv_b': 'mmdwnet::mmpretrain/dwconv_b_8xb128_in1k.py',
    'ddwconv_b': 'mmdwnet::mmpretrain/ddwconv_b_8xb128_in1k.py',
    'iddwconv_b': 'mmdwnet::mmpretrain/iddwconv_b_8xb128_in1k.py',
    'swin_t': 'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py',
    'convnext_t': 'mmpretrain::convnext/convnext-tiny_32xb128_in1k.py',
}
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
BASELINE = 'swin_t'


def is_ours(name: str) -> bool:
    """Whether :data:`MODELS` ``name`` is an mmdwnet model (not a comparison model)."""
    return MODELS[name].startswith('mmdwnet::')


def build_classifier(name: str) -> nn.Module:
    """The ImageNet classifier of ``name`` (a key of :data:`MODELS`) from its config (in
    eval mode; the timed forward passes take images, not data samples, so the config's
    data preprocessor and batch augmentations play no part)."""
    if name not in MODELS:
        raise ValueError(f'unknown model {name!r}; choose from {sorted(MODELS)}')
    cfg = get_config(MODELS[name])
    if cfg.model.backbone.get('type') == 'SwinTransformer':
        # other input sizes than 224 (no effect at 224, where every map fits the windows)
        cfg.model.backbone.pad_small_map = True
    return build_model(cfg)


def inference_model(model: nn.Module, fuse: bool) -> Tuple[nn.Module, bool]:
    """An eval-mode copy, and whether its BatchNorms were folded: with ``fuse``, where
    the backbone can (``switch_to_deploy``). Models without it run unchanged."""
    model = deepcopy(model).eval()
    fused = fuse and hasattr(model.backbone, 'switch_to_deploy')
    if fused:
        model.backbone.switch_to_deploy()
    return model, fused


@torch.no_grad()
def calibrate_batchnorms(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to those of ``images`` (one train-mode
    forward, cumulative averages), so that a randomly initialised model normalises its
    activations as a trained one does; other layers are left as they are."""
    from torch.nn.modules.batchnorm import _BatchNorm
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    mode = model.training
    model.train()
    model(images, mode='tensor')
    model.train(mode)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model


@torch.no_grad()
def trained_like(model: nn.Module, images: torch.Tensor, residual_scale: float = 0.3) -> nn.Module:
    """Condition a randomly initialised classifier the way training conditions it, for
    precision comparisons without released weights: BatchNorm statistics from ``images``
    (:func:`calibrate_batchnorms`) and, in a DWNet, the residual branches' last layers
    (each block's ``norm3`` and FFN output layer) scaled by ``residual_scale``, as trained
    residual networks add small updates to the stream. At full random scale a DWNet is
    chaotic: a relative perturbation of 2^-9 of the input alone changes I-D-DW-T's
    last features by about 20% in float32, so any rounding is amplified block by block."""
    calibrate_batchnorms(model, images)
    from mmdwnet.models.backbones.dwnet import DWBlock
    for block in model.modules():
        if isinstance(block, DWBlock):
            for layer in (block.norm3, block.ffn.layers[1]):
                layer.weight.mul_(residual_scale)
                layer.bias.mul_(residual_scale)
    return model


@torch.no_grad()
def precision_agreement(model: nn.Module, images: torch.Tensor, dtype: str) -> Dict:
    """How the eval-mode ``model``'s logits under ``torch.autocast`` in ``dtype`` compare
    with float32: ``max_logit_diff`` (largest absolute difference), ``logit_range``
    (largest absolute float32 logit, for scale) and ``top1_agreement`` (fraction of
    images with the same top-1 class)."""
    device = images.device.type
    reference = model(images, mode='tensor').float()
    with torch.autocast(device_type=device, dtype=DTYPES[dtype]):
        low = model(images, mode='tensor').float()
    return dict(max_logit_diff=(low - reference).abs().max().item(),
                logit_range=reference.abs().max().item(),
                top1_agreement=(low.argmax(1) == reference.argmax(1)).float().mean().item())


# /proc/cpuinfo flags that decide which matrix-product and conversion paths a CPU has
ISA_FLAGS = {
    'avx2': 'AVX2',
    'avx512f': 'AVX-512',
    'avx512_bf16': 'AVX-512 BF16',
    'avx512_fp16': 'AVX-512 FP16',
    'amx_tile': 'AMX',
    'amx_bf16': 'AMX-BF16',
    'amx_fp16': 'AMX-FP16',
}
# a dtype is native on a CPU with any of these flags (otherwise oneDNN emulates it)
NATIVE_FLAGS = {'bf16': ('avx512_bf16', 'amx_bf16'), 'fp16': ('avx512_fp16', 'amx_fp16')}


def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f
                        if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def isa_summary(flags: Optional[set] = None) -> str:
    """e.g. ``'AVX2 yes, AVX-512 yes, AVX-512 BF16 yes, AVX-512 FP16 no, AMX no, ...'``"""
    flags = cpu_flags() if flags is None else flags
    return ', '.join(f"{name} {'yes' if flag in flags else 'no'}"
                     for flag, name in ISA_FLAGS.items())


def is_native(dtype: str, flags: Optional[set] = None) -> bool:
    """Whether the CPU computes ``dtype`` in hardware (fp32 always)."""
    flags = cpu_flags() if flags is None else flags
    return dtype == 'fp32' or any(f in flags for f in NATIVE_FLAGS[dtype])


def matmul_peak_gflops(dtype: str = 'fp32', device: str = 'cpu', repeats: int = 3,
                       sizes: Sequence[int] = (1024, 2048, 3072)) -> float:
    """The machine's matrix-product peak in ``dtype`` (GFLOP/s, 2 FLOPs per
    multiply-add), measured now: the best median over square products of ``sizes`` by
    the fastest of the libraries the models' products run in
    (:func:`~analysis_tools.matrix_products.time_product`: ``torch.mm`` and, on CPU,
    oneDNN's linear layer), with the threads the models use. Computed in ``dtype``
    directly, as autocast runs the products. (``torch.mm`` alone, which runs MKL in
    float32, reached about 20% less than oneDNN on the AMD EPYC hosts.)"""
    name = str(DTYPES[dtype]).removeprefix('torch.')
    return max(2 * n**3 / time_product(Product(1, n, n, n, name), device, calls=repeats) / 1e9
               for n in sizes)


def count_model_flops(model: nn.Module, img_size: int, device: str = 'cpu') -> int:
    """Multiply-accumulates of one ``img_size`` image through the classifier, counted as
    ``tools/get_flops.py`` counts them (mmengine's FlopAnalyzer with mmdwnet's rules)."""
    from mmdwnet.utils.complexity import _TensorForward, count_flops
    model = deepcopy(model).eval().to(device)
    inputs = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return count_flops(_TensorForward(model, None), (inputs.to(device), ))


class BenchmarkedModel:
    """Timed inference and training steps of one model on a fixed batch."""

    def __init__(self, name: str, device: str, batch_size: int, img_size: int, dtype: str,
                 fuse: bool, seed: int = 0):
        torch.manual_seed(seed)
        self.name, self.device, self.dtype = name, device, dtype
        self.model = build_classifier(name).to(device).train()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.infer, self.fused = inference_model(self.model, fuse)
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(batch_size, 3, img_size, img_size,
                                  generator=generator).to(device)
        self.single = self.inputs[:1].clone()  # batch-1 latency, as deployment runs
        self.labels = torch.randint(0, 1000, (batch_size, ), generator=generator).to(device)
        # torch's fused AdamW (one kernel for all parameters; CPU and CUDA) for every
        # model alike; the default per-tensor loop would time the optimizer's Python
        # overhead, which grows with the number of parameter tensors, not the model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4,
                                           weight_decay=0.05, fused=True)

    def _autocast(self):
        if self.dtype == 'fp32':
            return nullcontext()
        return torch.autocast(device_type=self.device.split(':')[0], dtype=DTYPES[self.dtype])

    def inference(self, single: bool = False, fp32: bool = False) -> float:
        """Seconds for one inference of the batch (or of one image, ``single``); with
        ``fp32``, without autocast (the model's own float32 speed)."""
        synchronize(self.device)
        start = time.perf_counter()
        with torch.inference_mode(), nullcontext() if fp32 else self._autocast():
            self.infer(self.single if single else self.inputs, mode='tensor')
        synchronize(self.device)
        return time.perf_counter() - start

    def matrix_products(self) -> Counter:
        """The matrix products of one inference of the batch, as timed
        (:func:`~analysis_tools.matrix_products.record_matrix_products`)."""
        with torch.inference_mode(), self._autocast():
            return record_matrix_products(lambda: self.infer(self.inputs, mode='tensor'))

    def train_step(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        with self._autocast():
            logits = self.model(self.inputs, mode='tensor')
            loss = F.cross_entropy(logits.float(), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        synchronize(self.device)
        return time.perf_counter() - start


def measure_speed(names: Sequence[str], device: str = 'cpu', batch_size: int = 16,
                  img_size: int = 224, dtype: str = 'fp32', repeats: int = 5,
                  warmup: int = 2, fuse: bool = True, train: bool = True,
                  progress: Optional[Callable[[str], None]] = None,
                  after_each_repeat: Optional[Callable[[], None]] = None) -> List[Dict]:
    """Median inference throughput (batch ``batch_size``), batch-1 latency and
    training-step time of each model, interleaved; and its multiply-accumulates per image
    (``flops``); the GFLOP of its matrix products per image (``product_gflop``, 2 FLOPs
    per multiply-add) and the throughput the model would have if nothing but those
    products took time, each timed alone in every repeat (``products_img_per_s``, None
    for a model without products; see :mod:`analysis_tools.matrix_products`).
    For fp16/bf16, also how its logits agree with fp32
    (:func:`precision_agreement`) on 8 natural-looking images, for the model conditioned
    as training would (:func:`trained_like`) and in the timed (folded) form, and its
    float32 inference throughput timed in the same repeats (``fp32_img_per_s``), so that
    ``vs_fp32`` is a ratio taken in one run.
    ``after_each_repeat`` runs after the models of every repeat: a measurement interleaved
    with theirs (the matrix-product peak, :func:`matmul_peak_gflops`), so that both see the
    same state of the machine."""
    timed, products = [], {}
    for name in names:
        if progress:
            progress(f'building {name}')
        timed.append(BenchmarkedModel(name, device, batch_size, img_size, dtype, fuse))
        products[name] = timed[-1].matrix_products()
    for i in range(warmup):
        for m in timed:
            if progress:
                progress(f'warm-up {i + 1}/{warmup}: {m.name}')
            m.inference()
            m.inference(single=True)
            if train:
                m.train_step()
    infer = {m.name: [] for m in timed}
    infer_fp32 = {m.name: [] for m in timed}  # fp16/bf16 runs: the same models in fp32
    latency = {m.name: [] for m in timed}
    step = {m.name: [] for m in timed}
    alone = {m.name: [] for m in timed}  # the model's matrix products, each timed alone
    # torch.utils.benchmark times one statement at a time: the models here alternate per repeat
    for i in range(repeats):
        for m in timed:
            infer[m.name].append(m.inference())
            if dtype != 'fp32':
                infer_fp32[m.name].append(m.inference(fp32=True))
            # one image is quick: its median over 3 calls per repeat
            latency[m.name].append(statistics.median(m.inference(single=True)
                                                     for _ in range(3)))
            if train:
                step[m.name].append(m.train_step())
            alone[m.name].append(products_seconds(
                products[m.name], lambda product: time_product(product, device)))
            if progress:
                msg = (f'repeat {i + 1}/{repeats}: {m.name} inference {infer[m.name][-1]:.3f} s'
                       f', batch-1 latency {latency[m.name][-1] * 1e3:.1f} ms')
                if dtype != 'fp32':
                    msg += f', fp32 inference {infer_fp32[m.name][-1]:.3f} s'
                if train:
                    msg += f', training step {step[m.name][-1]:.3f} s'
                msg += f', its matrix products alone {alone[m.name][-1]:.3f} s'
                progress(msg)
        if after_each_repeat is not None:
            after_each_repeat()
    rows = []
    for m in timed:
        seconds = statistics.median(infer[m.name])
        rows.append(dict(
            model=m.name, params=m.params, fused=m.fused,
            img_per_s=batch_size / seconds,
            latency_ms=statistics.median(latency[m.name]) * 1e3,
            train_step_s=statistics.median(step[m.name]) if train else None,
            flops=count_model_flops(m.model, img_size, device),
            product_gflop=product_flops(products[m.name]) / batch_size / 1e9,
            products_img_per_s=(batch_size / statistics.median(alone[m.name])
                                if products[m.name] else None)))
        if dtype != 'fp32':
            rows[-1]['fp32_img_per_s'] = batch_size / statistics.median(infer_fp32[m.name])
            rows[-1]['vs_fp32'] = rows[-1]['img_per_s'] / rows[-1]['fp32_img_per_s']
    if dtype != 'fp32':
        from mmdwnet.testing import natural_images
        images = natural_images(8, img_size).to(device)
        for m, row in zip(timed, rows):
            if progress:
                progress(f'{dtype} against fp32 logits: {m.name}')
            model = trained_like(deepcopy(m.model), images)
            row.update(precision_agreement(inference_model(model, fuse)[0], images, dtype))
    return rows


def add_efficiency(rows: List[Dict], peak_gflops: float) -> List[Dict]:
    """``gflops_per_s`` (2 FLOPs per counted multiply-accumulate, at the measured
    throughput) and ``peak_fraction`` (of the matrix-product peak ``peak_gflops`` in the
    same dtype) for every row; where a row has its own fp32 throughput from the same run
    (a bf16/fp16 run), ``vs_fp32_ceiling``: the most ``vs_fp32`` could be here, its
    throughput at 100% of ``peak_gflops`` over its fp32 throughput. Where its matrix
    products were timed alone, the most ``peak_fraction`` and ``vs_fp32`` could be with
    nothing but those products taking time: ``peak_fraction_products`` (its counted
    FLOPs at that throughput) and ``vs_fp32_products``."""
    for r in rows:
        r['gflops_per_s'] = 2 * r['flops'] * r['img_per_s'] / 1e9
        r['peak_gflops'] = peak_gflops
        r['peak_fraction'] = r['gflops_per_s'] / peak_gflops
        products = r.get('products_img_per_s')
        if products:
            r['peak_fraction_products'] = 2 * r['flops'] * products / 1e9 / peak_gflops
        if r.get('fp32_img_per_s'):
            r['vs_fp32_ceiling'] = peak_images_per_s(r) / r['fp32_img_per_s']
            if products:
                r['vs_fp32_products'] = products / r['fp32_img_per_s']
    return rows


def peak_images_per_s(row: Dict) -> float:
    """The images per second of ``row``'s model with all its counted FLOPs at the rate of
    the measured matrix-product peak, the fastest this machine was seen to multiply in
    the row's dtype: what its throughput could at most be here."""
    return row['peak_gflops'] * 1e9 / (2 * row['flops'])


# ---------------------------------------------------------------------------------------
# reporting

def add_ratios(rows: List[Dict], baseline: str = BASELINE) -> List[Dict]:
    """``speedup`` (inference img/s) and ``train_speedup`` (training-step time) relative
    to ``baseline`` when it was measured. Where :func:`add_efficiency` ran, also
    ``speedup_ceiling``: the most ``speedup`` could be on this machine, the model at 100%
    of the peak against the baseline as measured; a target above it is out of reach here.
    Where the rows have it, ``speedup_products``: the ratio if the model took only the
    time of its matrix products, each alone (usually a tighter bound of the same kind).
    """
    base = next((r for r in rows if r['model'] == baseline), None)
    for r in rows:
        r['speedup'] = r['img_per_s'] / base['img_per_s'] if base else None
        if base and r.get('peak_gflops'):
            r['speedup_ceiling'] = peak_images_per_s(r) / base['img_per_s']
        if base and r.get('products_img_per_s'):
            r['speedup_products'] = r['products_img_per_s'] / base['img_per_s']
        r['train_speedup'] = (base['train_step_s'] / r['train_step_s']
                              if base and r.get('train_step_s') else None)
    return rows


def machine_description(device: str) -> str:
    if device.startswith('cuda'):
        return torch.cuda.get_device_name(device)
    return f'{cpu_model()}, {torch.get_num_threads()} threads'


def format_table(rows: List[Dict], baseline: str = BASELINE) -> str:
    """The rows of :func:`measure_speed` (with :func:`add_ratios`, :func:`add_efficiency`
    and peak memory where measured) as a Markdown table; '-' where a value was not
    measured."""
    def num(value, fmt):
        return '-' if value is None else format(value, fmt)

    def ratio(value):
        return '-' if value is None else f'{value:.2f}x'

    def percent(value):
        return '-' if value is None else f'{value:.0%}'

    columns = [  # (header, alignment, cell of a row)
        ('model', 'left', lambda r: r['model']),
        ('params', 'right', lambda r: f"{r['params'] / 1e6:.1f}M"),
        ('GMACs', 'right', lambda r: num(r.get('flops') and r['flops'] / 1e9, '.2f')),
        ('img/s', 'right', lambda r: f"{r['img_per_s']:.2f}"),
        (f'vs {baseline}', 'right', lambda r: ratio(r.get('speedup'))),
        (f'vs {baseline}, products alone', 'right', lambda r: ratio(r.get('speedup_products'))),
        (f'vs {baseline} at peak', 'right', lambda r: ratio(r.get('speedup_ceiling'))),
        ('GFLOP/s', 'right', lambda r: num(r.get('gflops_per_s'), '.0f')),
        ('of peak', 'right', lambda r: percent(r.get('peak_fraction'))),
        ('of peak, products alone', 'right', lambda r: percent(r.get('peak_fraction_products'))),
        ('batch-1 latency (ms)', 'right', lambda r: num(r.get('latency_ms'), '.1f')),
        ('train step (s)', 'right', lambda r: num(r.get('train_step_s'), '.3f')),
        (f'train vs {baseline}', 'right', lambda r: ratio(r.get('train_speedup'))),
        ('peak mem train (MiB)', 'right', lambda r: num(r.get('peak_mem_mb'), '.0f')),
        ('peak mem infer (MiB)', 'right', lambda r: num(r.get('infer_peak_mem_mb'), '.0f')),
        ('BN folded', 'left', lambda r: 'yes' if r['fused'] else 'no'),
    ]
    if any('vs_fp32' in r for r in rows):
        columns[7:7] = [('vs own fp32', 'right', lambda r: ratio(r.get('vs_fp32'))),
                        ('vs own fp32, products alone', 'right',
                         lambda r: ratio(r.get('vs_fp32_products'))),
                        ('vs own fp32 at peak', 'right',
                         lambda r: ratio(r.get('vs_fp32_ceiling')))]
    if any('top1_agreement' in r for r in rows):
        columns += [
            ('max logit diff vs fp32', 'right', lambda r: f"{num(r.get('max_logit_diff'), '.3f')}"
             f" (of {num(r.get('logit_range'), '.1f')})"),
            ('top-1 agreement', 'right', lambda r: percent(r.get('top1_agreement'))),
        ]
    return '\n'.join(markdown_table([c[0] for c in columns],
                                    ([c[2](r) for c in columns] for r in rows),
                                    [c[1] for c in columns]))


def plot(rows: List[Dict], path: str, title: str) -> None:
    """Throughput against parameters, one labelled point per model."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        ours = is_ours(r['model'])
        ax.scatter(r['params'] / 1e6, r['img_per_s'], marker='o' if ours else 's',
                   color='tab:blue' if ours else 'tab:gray')
        ax.annotate(r['model'], (r['params'] / 1e6, r['img_per_s']),
                    textcoords='offset points', xytext=(4, 4), fontsize=8)
    ax.set_xlabel('parameters (M)')
    ax.set_ylabel('inference throughput (img/s)')
    ax.set_title(textwrap.fill(title, 80), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
