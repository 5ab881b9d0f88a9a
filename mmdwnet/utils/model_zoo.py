"""The model zoo's one source of truth: ``configs/*/metafile.yml``.

The metafiles (OpenMMLab model-index format, imported by ``model-index.yml``, so
``mim search mmdwnet`` reads them) hold, per config: the task, dataset, the paper's metrics,
the parameters and FLOPs counted here (:mod:`mmdwnet.utils.complexity`), and under
``Converted From`` the authors' checkpoint and the metrics they reported for it. This module
reads and writes them; the README's model-zoo tables and docs/ablations.md are rendered from
them by ``tools/model_zoo.py`` with ``analysis_tools.model_zoo_tables``; nothing is copied by
hand. The metafiles are read from the installed package's configs
(``mmdwnet/.mim/configs``, where ``mmdwnet::`` config paths point), so that this works from a
wheel as from a checkout.
"""
import os.path as osp
from typing import Callable, Dict, List, Optional, Sequence

import yaml

#: The package's configs: ``mmdwnet::PATH`` is ``CONFIG_ROOT/PATH``.
CONFIG_ROOT = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), '.mim', 'configs')
METAFILES = ('mmpretrain/metafile.yml', 'mmdet/metafile.yml', 'mmseg/metafile.yml',
             'mmpretrain/ablations/metafile.yml')


def is_ablation(model: Dict) -> bool:
    return 'Ablation' in model['Metadata']


class _Dumper(yaml.SafeDumper):
    """Indents list items under their key, as the OpenMMLab metafiles are written."""

    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)


def load_metafile(path: str) -> Dict:
    with open(path) as f:
        return yaml.safe_load(f)


def dump_metafile(data: Dict, path: str) -> None:
    with open(path, 'w') as f:
        yaml.dump(data, f, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)


def config_path(model: Dict) -> str:
    """The file of a metafile entry's ``Config`` (``configs/...``, as the model index
    writes it) in the package's configs."""
    return osp.join(CONFIG_ROOT, osp.relpath(model['Config'], 'configs'))


def load_models(root: str = CONFIG_ROOT, metafiles: Sequence[str] = METAFILES) -> List[Dict]:
    """Every model entry of the metafiles (under ``root``), in file order."""
    models = []
    for rel in metafiles:
        models.extend(load_metafile(osp.join(root, rel))['Models'])
    return models


def input_size(model: Dict) -> Optional[tuple]:
    """(height, width) of a metafile entry's ``Input Size`` ("WxH"), or None."""
    size = model['Metadata'].get('Input Size')
    if not size:
        return None
    width, height = (int(v) for v in size.split('x'))
    return height, width


def update_complexity(root: str = CONFIG_ROOT,
                      metafiles: Sequence[str] = METAFILES,
                      names: Optional[Sequence[str]] = None,
                      progress: Optional[Callable[[str], None]] = None) -> List[str]:
    """Recount ``Parameters`` and ``FLOPs`` of the metafiles' configs (all, or ``names``)
    at the paper's input sizes and write back the metafiles whose numbers changed. Returns
    the names whose numbers changed; unknown names raise before anything is counted."""
    from mmengine.config import Config

    from .complexity import model_complexity
    missing = set(names or ()) - {m['Name'] for m in load_models(root, metafiles)}
    if missing:
        raise ValueError(f'no metafile entry named {sorted(missing)}')
    updated = []
    for rel in metafiles:
        path = osp.join(root, rel)
        data = load_metafile(path)
        changed = False
        for model in data['Models']:
            if names and model['Name'] not in names:
                continue
            if progress:
                progress(f'counting {model["Config"]}')
            row = model_complexity(Config.fromfile(config_path(model)),
                                   input_size(model))
            counted = dict(Parameters=row['params'], FLOPs=row['flops'])
            if any(model['Metadata'].get(k) != v for k, v in counted.items()):
                model['Metadata'].update(counted)
                updated.append(model['Name'])
                changed = True
        if changed:
            dump_metafile(data, path)
    return updated
