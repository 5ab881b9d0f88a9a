"""The tables of the model zoo, rendered from the metafiles' entries
(:func:`mmdwnet.utils.model_zoo.load_models`) by ``tools/model_zoo.py readme``: the README's
model-zoo section and the table of docs/ablations.md."""
import os.path as osp
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from analysis_tools.markdown import markdown_table, section_markers
from mmdwnet.utils.model_zoo import is_ablation

MODEL_ZOO_MARKERS = section_markers('model-zoo', 'tools/model_zoo.py readme', 'edit the metafiles')
ABLATIONS_MARKERS = section_markers('ablations', 'tools/model_zoo.py readme', 'edit the metafiles')


def _millions(n: int) -> str:
    return f'{n / 1e6:.2f}M'


def _giga(n: int) -> str:
    return f'{n / 1e9:.2f}G'


def _config_link(model: Dict, page_dir: str) -> str:
    """A link to the entry's config from a page in ``page_dir`` (relative to the
    repository root)."""
    return f"[config]({osp.relpath(model['Config'], page_dir or '.')})"


def _official(model: Dict, metric_names: Sequence[str]) -> str:
    source = model.get('Converted From')
    if not source:
        return '-'
    reported = source.get('Metrics', {})
    values = ' / '.join(str(reported[m]) for m in metric_names if m in reported)
    name = osp.basename(source['Weights'])
    return f"[{name}]({source['Weights']})" + (f' ({values})' if values else '')


def _metrics(model: Dict) -> Dict:
    merged = {}
    for result in model['Results']:
        merged.update(result['Metrics'])
    return merged


def _table(models: List[Dict], columns: Sequence[Tuple[str, str, Optional[Callable]]],
           page_dir: str) -> List[str]:
    """A Markdown table: one row per model; ``columns`` are (header, alignment, cell
    function of (model, metadata, merged metrics)); the cell function None is the link to
    the config from a page in ``page_dir``."""
    rows = ([_config_link(m, page_dir) if c[2] is None else c[2](m, m['Metadata'], _metrics(m))
             for c in columns] for m in models)
    return markdown_table([c[0] for c in columns], rows, [c[1] for c in columns])


def _metric(name: str, header: Optional[str] = None) -> Tuple[str, str, Callable]:
    return (header or name, 'right', lambda m, meta, metrics: metrics.get(name, '-'))


def _backbone(header: str = 'backbone') -> Tuple[str, str, Callable]:
    return (header, 'left', lambda m, meta, metrics: meta['Backbone'])


def _official_column(header: str, metric_names: Sequence[str]) -> Tuple[str, str, Callable]:
    return (f"authors' checkpoint ({header})", 'left',
            lambda m, meta, metrics: _official(m, metric_names))


PARAMS = ('params', 'right', lambda m, meta, metrics: _millions(meta['Parameters']))
FLOPS = ('FLOPs', 'right', lambda m, meta, metrics: _giga(meta['FLOPs']))
PAPER_SIZE = ('paper params / FLOPs', 'right', lambda m, meta, metrics:
              f"{meta.get('Paper Parameters', '-')} / {meta.get('Paper FLOPs', '-')}")
CONFIG = ('', 'left', None)  # a link from the page the table goes in: see _with_links

CLASSIFICATION_COLUMNS = [
    _backbone('model'),
    ('params', 'right', lambda m, meta, metrics: f"{meta['Parameters']:,}"),
    FLOPS, PAPER_SIZE,
    ('img/s (V100, paper)', 'right', lambda m, meta, metrics: meta['Paper Throughput (img/s)']),
    _metric('Top 1 Accuracy', 'top-1 (paper)'),
    _official_column('top-1', ['Top 1 Accuracy']), CONFIG,
]
DETECTION_COLUMNS = [
    _backbone(), PARAMS, FLOPS, PAPER_SIZE, *map(_metric, ['box AP', 'AP50', 'AP75', 'mask AP']),
    _official_column('box / mask AP', ['box AP', 'mask AP']), CONFIG,
]
SEGMENTATION_COLUMNS = [
    _backbone(), PARAMS, FLOPS, PAPER_SIZE, _metric('mIoU', 'mIoU (paper)'),
    _official_column('mIoU', ['mIoU']), CONFIG,
]
ABLATION_COLUMNS = [
    ('paper', 'left', lambda m, meta, metrics: meta['Paper Table']),
    _backbone('variant'),
    ('what changes', 'left', lambda m, meta, metrics: meta['Ablation']),
    PARAMS, FLOPS, PAPER_SIZE, _metric('Top 1 Accuracy', 'top-1 (paper)'), CONFIG,
]


TABLES = {
    'Image Classification': (
        'ImageNet-1K classification, 224x224 (paper Table 2)', CLASSIFICATION_COLUMNS),
    'Object Detection': (
        'COCO, Cascade Mask R-CNN 3x, FLOPs at 1280x800 (paper Table 3)', DETECTION_COLUMNS),
    'Semantic Segmentation': (
        'ADE20K, UPerNet 160k, single-scale mIoU, FLOPs at 2048x512 (paper Table 3)',
        SEGMENTATION_COLUMNS),
}


def render_model_zoo(models: List[Dict], page_dir: str = '') -> str:
    """The README's model-zoo section body (Markdown) from the metafile entries, with links
    from a page in ``page_dir`` (relative to the repository root; '' for the README)."""
    out = [
        'Generated from `configs/*/metafile.yml` by `python tools/model_zoo.py readme`. '
        '"params" and "FLOPs" (multiply-accumulates, as in the paper) are counted on the '
        'models built here by `tools/get_flops.py`; metrics are the paper\'s. The authors\' '
        'checkpoints are in their code\'s layout: convert them with '
        '`tools/model_converters/official_to_mmdwnet.py` (no I-D-DW weights were released).',
    ]
    for task, (title, columns) in TABLES.items():
        rows = [m for m in models if not is_ablation(m) and m['Results'][0]['Task'] == task]
        if rows:
            out += ['', f'**{title}**', ''] + _table(rows, columns, page_dir)
    return '\n'.join(out)


def render_ablations(models: List[Dict], page_dir: str = 'docs') -> str:
    """The ablation table of docs/ablations.md (Markdown) from the ablation metafile
    entries, with links from a page in ``page_dir``."""
    lines = [
        'Generated from the ablation entries of `configs/*/metafile.yml` (ImageNet: '
        '`configs/mmpretrain/ablations/metafile.yml`) by `python tools/model_zoo.py '
        'readme`; params and FLOPs counted here (at the input '
        'size of each config: 224, 384, 1280x800 or 2048x512), top-1 from the paper '
        '(ImageNet-1K).', ''
    ]
    # ImageNet ablations first, then the dense ones (in the mmdet and mmseg metafiles)
    ablations = sorted(filter(is_ablation, models),
                       key=lambda m: not m['Config'].startswith('configs/mmpretrain/'))
    return '\n'.join(lines + _table(ablations, ABLATION_COLUMNS, page_dir))
