"""Keep the model zoo's metafiles, the README and docs/ablations.md in step.

    python tools/model_zoo.py readme           # render the README's model-zoo tables and
                                               # the table of docs/ablations.md
    python tools/model_zoo.py readme --check   # exit 1 if either page is out of date
    python tools/model_zoo.py measure [NAME ...]  # recount Parameters / FLOPs in the metafiles

The metafiles (configs/*/metafile.yml) are the only place the numbers are written by hand
(paper metrics, authors' checkpoints); parameters and FLOPs are counted by `measure`.
"""
import argparse
import os.path as osp
import sys

from analysis_tools.markdown import replace_section
from analysis_tools.model_zoo_tables import (ABLATIONS_MARKERS, MODEL_ZOO_MARKERS,
                                             render_ablations, render_model_zoo)
from mmdwnet.utils.model_zoo import load_models, update_complexity

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    readme = sub.add_parser('readme', help='render the README and docs/ablations.md tables '
                            'from the metafiles')
    readme.add_argument('--check', action='store_true',
                        help='do not write; exit 1 if a page differs from the metafiles')
    readme.add_argument('--readme', default=osp.join(ROOT, 'README.md'))
    readme.add_argument('--ablations-doc', default=osp.join(ROOT, 'docs', 'ablations.md'))
    measure = sub.add_parser('measure', help='recount parameters and FLOPs')
    measure.add_argument('names', nargs='*', help='metafile model names (default: all)')
    return parser.parse_args()


def main():
    args = parse_args()
    if args.command == 'measure':
        try:
            updated = update_complexity(
                names=args.names, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        except ValueError as e:
            sys.exit(f'error: {e}')
        print(f'{len(updated)} metafile entries changed'
              + ('; now run: python tools/model_zoo.py readme' if updated else ''))
        return
    models = load_models()
    pages = [(args.readme, render_model_zoo(models), MODEL_ZOO_MARKERS),
             (args.ablations_doc, render_ablations(models), ABLATIONS_MARKERS)]
    for path, body, (start, end) in pages:
        try:
            changed = replace_section(path, body, start, end, check=args.check)
        except (OSError, ValueError) as e:
            sys.exit(f'error: {e}')
        if args.check and changed:
            sys.exit(f'error: {path} is out of date with configs/*/metafile.yml; run '
                     'python tools/model_zoo.py readme')
        print(f'{path}: ' + ('updated' if changed else 'up to date'))


if __name__ == '__main__':
    main()
