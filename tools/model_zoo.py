"""Keep the model zoo's metafiles and the README in step.

    python tools/model_zoo.py readme           # render the README's model-zoo tables
    python tools/model_zoo.py readme --check   # exit 1 if the README is out of date
    python tools/model_zoo.py measure [NAME ...]  # recount Parameters / FLOPs in the metafiles

The metafiles (configs/*/metafile.yml) are the only place the numbers are written by hand
(paper metrics, authors' checkpoints); parameters and FLOPs are counted by `measure`.
"""
import argparse
import os.path as osp
import sys

from mmdwnet.utils.model_zoo import (ABLATIONS_END, ABLATIONS_START, REPO_ROOT, load_models,
                                     render_ablations, render_model_zoo, update_complexity,
                                     update_readme)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    readme = sub.add_parser('readme', help='render the README tables from the metafiles')
    readme.add_argument('--check', action='store_true',
                        help='do not write; exit 1 if the README differs from the metafiles')
    readme.add_argument('--readme', default=osp.join(REPO_ROOT, 'README.md'))
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
    try:
        changed = update_readme(args.readme, render_model_zoo(models), check=args.check)
        changed |= update_readme(args.readme, render_ablations(models), check=args.check,
                                 start=ABLATIONS_START, end=ABLATIONS_END)
    except ValueError as e:
        sys.exit(f'error: {e}')
    if args.check and changed:
        sys.exit(f'error: {args.readme} is out of date with configs/*/metafile.yml; run '
                 'python tools/model_zoo.py readme')
    print(f'{args.readme}: ' + ('updated' if changed else 'up to date'))


if __name__ == '__main__':
    main()
