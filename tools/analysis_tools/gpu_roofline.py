"""Predicted GPU time of DWNet's depth-wise operators, from the bytes their kernels move and
the FLOPs they do against a GPU's limits: a lower bound per layer, per stage and per
network, to be checked by the first GPU run (``tools/gpu_check.sh`` compares).

What a kernel moves is counted from its loads and stores, assuming that within a program
the halo a tap reads again comes from L2 (each element of a map or of the predicted
kernels crosses HBM once per pass):

- I-D-DW forward and input gradient (:mod:`mmdwnet.ops.triton_idwconv`): read the map
  (B*C*HW) and the kernels (B*G*K*K*HW), write the map; 2*K*K FLOPs per output element, on
  the CUDA cores (no tensor cores);
- I-D-DW kernel gradient: read the output gradient and the map, write the kernels' gradient;
- kernel prediction on the GPU (a batched matrix product, tensor cores): read the predictor
  input (B*C/4*HW) and weight, write the kernels, which the application reads back (counted
  there);
- for comparison, at the same shapes: ConvNeXt-T's 7x7 depth-wise convolution (read and
  write the map, 2*49 FLOPs per element) and Swin-T's window attention as one fused kernel
  (read Q, K, V, write the output; 4*49*C FLOPs per token on tensor cores).
"""
from typing import Dict, List

# NVIDIA H100 SXM: HBM3 bandwidth, dense tensor-core and CUDA-core (FP32 FMA) throughput.
GPUS = {
    'H100': dict(bandwidth=3.35e12, tensor_flops={'fp16': 989e12, 'bf16': 989e12,
                                                  'fp32': 495e12},
                 cuda_core_flops=67e12),
}
BYTES = {'fp16': 2, 'bf16': 2, 'fp32': 4}
ARCHS = {
    'tiny': dict(channels=(96, 192, 384, 768), depths=(2, 2, 6, 2)),
    'base': dict(channels=(128, 256, 512, 1024), depths=(2, 2, 18, 2)),
}
SIZES = (56, 28, 14, 7)  # stage maps at 224x224
GROUPS = 32  # C / group_channels at every stage of DWNet-T and -B
KERNEL_SIZE = 7
WINDOW = 7


def _bound(bytes_moved: float, flops: float, flops_per_s: float, gpu: Dict) -> Dict:
    memory_s, compute_s = bytes_moved / gpu['bandwidth'], flops / flops_per_s
    return dict(bytes=bytes_moved, flops=flops, memory_ms=memory_s * 1e3,
                compute_ms=compute_s * 1e3, bound_ms=max(memory_s, compute_s) * 1e3,
                limit='memory' if memory_s >= compute_s else 'compute')


def layer_bounds(channels: int, size: int, batch: int, dtype: str, gpu: Dict,
                 k: int = KERNEL_SIZE, groups: int = GROUPS) -> Dict[str, Dict]:
    """The bound of each kernel of one I-D-DW layer, and of the comparisons, at one stage."""
    e = BYTES[dtype]
    hw = size * size
    maps = batch * channels * hw
    kernels = batch * groups * k * k * hw
    apply_flops = 2 * k * k * maps
    cuda = gpu['cuda_core_flops']
    tensor = gpu['tensor_flops'][dtype]
    hidden = batch * channels // 4 * hw
    return {
        'idwconv_forward': _bound(e * (2 * maps + kernels), apply_flops, cuda, gpu),
        'idwconv_grad_input': _bound(e * (2 * maps + kernels), apply_flops, cuda, gpu),
        'idwconv_grad_weight': _bound(e * (2 * maps + kernels), apply_flops, cuda, gpu),
        'kernel_prediction': _bound(e * (hidden + kernels), 2 * kernels * channels // 4,
                                    tensor, gpu),
        'convnext_dwconv7': _bound(e * 2 * maps, 2 * 49 * maps, cuda, gpu),
        'swin_window_attention': _bound(e * 4 * maps, 4 * WINDOW**2 * maps, tensor, gpu),
    }


def predict(arch: str = 'tiny', batch: int = 128, dtype: str = 'bf16',
            gpu_name: str = 'H100') -> List[Dict]:
    """One row per stage (times for one layer and for the stage's layers) and a total row:
    the I-D-DW inference (prediction + forward) and training (+ input and kernel
    gradients, the prediction again in backward) bounds, and the comparisons."""
    gpu = GPUS[gpu_name]
    spec = ARCHS[arch]
    rows = []
    for stage, (channels, depth, size) in enumerate(zip(spec['channels'], spec['depths'],
                                                        SIZES)):
        b = layer_bounds(channels, size, batch, dtype, gpu)
        infer = b['kernel_prediction']['bound_ms'] + b['idwconv_forward']['bound_ms']
        train = (infer + b['kernel_prediction']['bound_ms'] + b['idwconv_grad_input']['bound_ms']
                 + b['idwconv_grad_weight']['bound_ms'])
        rows.append(dict(stage=stage + 1, channels=channels, size=size, layers=depth,
                         forward_ms=b['idwconv_forward']['bound_ms'],
                         forward_limit=b['idwconv_forward']['limit'],
                         forward_bytes=b['idwconv_forward']['bytes'],
                         infer_ms=infer * depth, train_ms=train * depth,
                         convnext_ms=b['convnext_dwconv7']['bound_ms'] * depth,
                         swin_ms=b['swin_window_attention']['bound_ms'] * depth))
    total = {key: sum(r[key] for r in rows)
             for key in ('infer_ms', 'train_ms', 'convnext_ms', 'swin_ms')}
    rows.append(dict(stage='all', channels='', size='', layers=sum(spec['depths']),
                     forward_ms=sum(r['forward_ms'] * r['layers'] for r in rows),
                     forward_limit='', forward_bytes=sum(r['forward_bytes'] * r['layers']
                                                         for r in rows), **total))
    return rows


def markdown(arch: str = 'tiny', batch: int = 128, dtype: str = 'bf16',
             gpu_name: str = 'H100') -> str:
    """The prediction as a Markdown table."""
    lines = [
        f'DWNet-{arch[0].upper()} I-D-DW layers, batch {batch}, 224x224, {dtype}, {gpu_name} '
        '(predicted, not measured): lower bounds in ms',
        '',
        '| stage | C | map | layers | I-D-DW forward, one layer (limit) | MiB moved, one '
        'layer | I-D-DW inference, all layers | I-D-DW training, all layers | ConvNeXt 7x7 '
        'DW, same layers | Swin window attention, same layers |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in predict(arch, batch, dtype, gpu_name):
        limit = f" ({r['forward_limit']})" if r['forward_limit'] else ' (all layers)'
        lines.append(f"| {r['stage']} | {r['channels']} | {r['size']} | {r['layers']} | "
                     f"{r['forward_ms']:.3f}{limit} | {r['forward_bytes'] / 2**20:.0f} | "
                     f"{r['infer_ms']:.2f} | {r['train_ms']:.2f} | {r['convnext_ms']:.2f} | "
                     f"{r['swin_ms']:.2f} |")
    return '\n'.join(lines)


if __name__ == '__main__':  # PYTHONPATH=tools python -m analysis_tools.gpu_roofline
    print('\n\n'.join(markdown(arch) for arch in ARCHS))
