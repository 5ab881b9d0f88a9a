"""Export a config's model out of PyTorch, optionally verified against eager PyTorch on the
same input:

- ``onnx``: standard ``ai.onnx`` operations only (mmdwnet's operators in their export
  forms, :mod:`mmdwnet.ops.export_form`), run by ONNX Runtime without any plugin;
- ``exported-program``: a ``torch.export`` program (``torch.export.save``), with mmdwnet's
  operators as registered custom operators (``mmdwnet::...``, fast kernels kept); load it
  with ``torch.export.load`` after ``import mmdwnet``.

What is exported, by task (the input is the preprocessed image batch, (B, 3, H, W)):

- classification: the whole ``ImageClassifier``, its logits;
- segmentation: the ``EncoderDecoder`` up to per-pixel logits at the input size;
- detection: backbone and neck, the feature maps (the heads' post-processing stays in
  PyTorch; see docs/deployment.md).
"""
import os
import os.path as osp
import tempfile
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmengine.config import Config
from torch import Tensor, nn

from mmdwnet.ops import export_mode
from mmdwnet.ops.export_form import ExportableAdaptiveAvgPool2d
from mmdwnet.utils import build_model, config_task
from mmdwnet.utils.launch import LaunchError, check_checkpoint_matches

FORMATS = ('onnx', 'exported-program')
#: (height, width) exported by default: the task's test size (mmdet's 1333 padded to 1344)
DEFAULT_SHAPES = {'mmpretrain': (224, 224), 'mmseg': (512, 512), 'mmdet': (800, 1344)}
MIN_SIZE = 32  # the backbone's total stride: smaller images leave less than one position
STANDARD_DOMAINS = {'', 'ai.onnx'}


class ExportError(RuntimeError):
    """A problem with the export request that the user has to fix."""


class ClassifierLogits(nn.Module):
    """An ``ImageClassifier`` from images to logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, mode='tensor')


class SegmentorLogits(nn.Module):
    """An ``EncoderDecoder`` from images to per-pixel class logits at the input size."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model.decode_head(self.model.extract_feat(x))
        return F.interpolate(logits, size=x.shape[2:], mode='bilinear',
                             align_corners=self.model.align_corners)


class DetectorFeatures(nn.Module):
    """A detector's backbone and neck: the multi-scale feature maps its heads read."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        return tuple(self.model.extract_feat(x))


WRAPPERS = {'mmpretrain': ClassifierLogits, 'mmseg': SegmentorLogits, 'mmdet': DetectorFeatures}


def _check_request(fmt: str, shape: Optional[Sequence[int]], verify: bool) -> None:
    if fmt not in FORMATS:
        raise ExportError(f'--format {fmt!r} is not one of {FORMATS}')
    if shape is not None and (len(shape) != 2 or not all(
            isinstance(s, int) and s >= MIN_SIZE for s in shape)):
        raise ExportError(f'--shape {tuple(shape)} must be two integers H W, each at least '
                          f'{MIN_SIZE} (the backbone reduces the image {MIN_SIZE}x)')
    if verify and fmt == 'onnx':
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ExportError('--verify needs onnxruntime to run the ONNX file, and it is not '
                              'installed; run bash tools/install.sh (or pip install '
                              'onnxruntime)') from None


def prepare_for_export(model: nn.Module, task: str,
                       progress: Callable[[str], None] = print) -> nn.Module:
    """``model`` (an mmpretrain/mmseg/mmdet model, weights loaded) ready to export: the
    backbone's BatchNorms folded, adaptive average poolings swapped for their export form,
    wrapped to give the task's output tensors (:data:`WRAPPERS`), in eval mode."""
    backbone = getattr(model, 'backbone', None)
    if hasattr(backbone, 'switch_to_deploy'):
        backbone.switch_to_deploy()
        progress('folded the backbone\'s BatchNorms into its convolutions '
                 '(DWNet.switch_to_deploy) before exporting')
    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.AdaptiveAvgPool2d and child.output_size not in (1, (1, 1)):
                setattr(module, child_name, ExportableAdaptiveAvgPool2d(child.output_size))
                swapped.append(f'{name}.{child_name}' if name else child_name)
    if swapped:
        progress(f'{len(swapped)} adaptive average pooling(s) ({", ".join(swapped)}) '
                 'export as averaging matrix products (ONNX pools adaptively only to size 1)')
    return WRAPPERS[task](model).eval()


def load_for_export(cfg: Config, checkpoint: str,
                    progress: Callable[[str], None] = print) -> Tuple[nn.Module, str]:
    """The config's model with the checkpoint loaded strictly, prepared by
    :func:`prepare_for_export`; and its task."""
    from mmengine.runner import load_checkpoint
    task = config_task(cfg)
    model = build_model(cfg)
    try:
        check_checkpoint_matches(model, checkpoint)
    except LaunchError as e:
        raise ExportError(str(e)) from None
    load_checkpoint(model, checkpoint, map_location='cpu', strict=True, logger='silent')
    return prepare_for_export(model, task, progress), task


def _outputs(result) -> Tuple[Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result, )


def _export_onnx(model: nn.Module, example: Tensor, path: str, dynamic: bool,
                 opset: int) -> None:
    import onnx
    axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}} if dynamic else None
    with torch.no_grad(), export_mode(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracer warnings on shape checks, deprecation
        # the TorchScript-based exporter: seconds where the torch.export-based one takes
        # minutes on the unrolled shifted-slice graphs (docs/deployment.md)
        torch.onnx.export(model, (example, ), path, input_names=['input'], dynamo=False,
                          dynamic_axes=axes, opset_version=opset)
    domains = {node.domain for node in onnx.load(path).graph.node}
    if not domains <= STANDARD_DOMAINS:
        raise ExportError(f'the exported graph uses the operator domains '
                          f'{sorted(domains - STANDARD_DOMAINS)}, not only the standard one')


def export_program(model: nn.Module, example: Tensor, dynamic: bool):
    """``torch.export.export`` of ``model`` on ``example``; with ``dynamic``, batch, height
    and width are dynamic (the ranges torch.export infers: height and width from 33, where
    every stage keeps at least 2 positions)."""
    from torch.export import Dim
    shapes = ({0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}, ) if dynamic else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return torch.export.export(model, (example, ), dynamic_shapes=shapes)


def _export_exported_program(model: nn.Module, example: Tensor, path: str, dynamic: bool,
                             opset: int) -> None:
    torch.export.save(export_program(model, example, dynamic), path)


def _load_onnx(path: str,
               threads: Optional[int] = None) -> Callable[[Tensor], Tuple[Tensor, ...]]:
    """The ONNX file run by ONNX Runtime on CPU; with ``threads``, that many threads, which
    do not spin-wait after a run (by default they do for a while, taking the cores from
    whatever runs next: eager DW-T at batch 1 took 108 ms after ONNX Runtime runs against
    58 ms alone, on 2 cores)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    return lambda x: tuple(torch.from_numpy(o) for o in session.run(None, {'input': x.numpy()}))


def _load_exported_program(path: str) -> Callable[[Tensor], Tuple[Tensor, ...]]:
    module = torch.export.load(path).module()

    def run(x: Tensor) -> Tuple[Tensor, ...]:
        with torch.no_grad():
            return _outputs(module(x))

    return run


EXPORTERS = {'onnx': _export_onnx, 'exported-program': _export_exported_program}
LOADERS = {'onnx': _load_onnx, 'exported-program': _load_exported_program}


def verify_export(model: nn.Module, path: str, inputs: Sequence[Tensor],
                  fmt: str = 'onnx') -> float:
    """The largest difference between the exported file's outputs (ONNX Runtime, or the
    loaded program) and eager PyTorch's on ``inputs``, relative to each output's largest
    magnitude."""
    worst = 0.
    run = LOADERS[fmt](path)
    for x in inputs:
        with torch.no_grad():
            expected = _outputs(model(x))
        got = run(x)
        if [tuple(g.shape) for g in got] != [tuple(e.shape) for e in expected]:
            raise ExportError(f'the exported model gives outputs of shapes '
                              f'{[tuple(g.shape) for g in got]} for input {tuple(x.shape)}, '
                              f'PyTorch {[tuple(e.shape) for e in expected]}')
        for g, e in zip(got, expected):
            scale = max(e.abs().max().item(), 1e-12)
            worst = max(worst, (g - e).abs().max().item() / scale)
    return worst


def export_model(cfg: Config, checkpoint: str, fmt: str, out: str,
                 shape: Optional[Sequence[int]] = None, dynamic: bool = False,
                 verify: bool = False, opset: int = 17,
                 progress: Callable[[str], None] = print) -> Dict:
    """Export the model of ``cfg`` with the weights of ``checkpoint`` to ``out``.

    Args:
        cfg (Config): An mmdwnet (or any mmpretrain/mmdet/mmseg) config.
        checkpoint (str): Its weights; they must fit the model exactly.
        fmt (str): One of :data:`FORMATS`: 'onnx' (standard ``ai.onnx`` operations only,
            run by ONNX Runtime) or 'exported-program' (``torch.export.save``).
        out (str): The file to write; it appears only once the export has succeeded.
        shape (Sequence[int], optional): (H, W) of the example input. Defaults to the
            task's test size (:data:`DEFAULT_SHAPES`).
        dynamic (bool): Batch, height and width as dynamic axes.
        verify (bool): Run the exported model on the example input (and, with ``dynamic``,
            on another batch size and odd image size) and compare with eager PyTorch.
        opset (int): ONNX opset. Defaults to 17.
        progress (callable): Receives one line per step.

    Returns:
        dict: ``task``, ``format``, ``out``, ``shape`` and, with ``verify``,
        ``max_rel_diff``.
    """
    _check_request(fmt, shape, verify)
    model, task = load_for_export(cfg, checkpoint, progress)
    return export_prepared(model, task, fmt, out, shape, dynamic, verify, opset, progress)


def export_prepared(model: nn.Module, task: str, fmt: str, out: str,
                    shape: Optional[Sequence[int]] = None, dynamic: bool = False,
                    verify: bool = False, opset: int = 17,
                    progress: Callable[[str], None] = print) -> Dict:
    """:func:`export_model` for a model already prepared by :func:`prepare_for_export`
    (same arguments, with the model and its task in place of config and checkpoint)."""
    _check_request(fmt, shape, verify)
    height, width = shape or DEFAULT_SHAPES[task]
    # a dynamic batch is traced at 2 (exporters may fix sizes 0 and 1 of an example)
    example = torch.randn(2 if dynamic else 1, 3, height, width,
                          generator=torch.Generator().manual_seed(0))
    out_dir = osp.dirname(osp.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix='.export-', suffix='.tmp')
    os.close(fd)
    try:
        progress(f'exporting the {task} model to {fmt} at {height}x{width}'
                 + (' with dynamic batch, height and width' if dynamic else ''))
        try:
            EXPORTERS[fmt](model, example, tmp, dynamic, opset)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001  (any exporter failure: one line, the cause)
            raise ExportError(f'the {task} model cannot be exported to {fmt}: '
                              f'{_first_line(e)}') from e
        result = dict(task=task, format=fmt, out=out, shape=(height, width))
        if verify:
            inputs = [example]
            if dynamic:
                inputs.append(torch.randn(3, 3, height + 7, width - 5,
                                          generator=torch.Generator().manual_seed(1)))
            result['max_rel_diff'] = verify_export(model, tmp, inputs, fmt)
            progress(f"verified on {len(inputs)} input(s): largest difference from PyTorch "
                     f"{result['max_rel_diff']:.2e} of the output scale")
        os.replace(tmp, out)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    progress(f'saved {out}')
    return result


def _first_line(e: Exception) -> str:
    """``Type: first line`` of an exception (exporter messages run to pages)."""
    text = str(e).strip()
    return f'{type(e).__name__}: {text.splitlines()[0] if text else ""}'
