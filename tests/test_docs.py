"""The README and docs/: a short README that starts with the quickstart, links that lead
somewhere. (The generated tables are checked against their sources in test_model_zoo.py
and test_tools/test_benchmark_tools.py.)"""
import glob
import os.path as osp
import re

import pytest
from helpers import ROOT

PAGES = ['README.md'] + sorted(osp.relpath(p, ROOT)
                               for p in glob.glob(osp.join(ROOT, 'docs', '*.md')))
LINK = re.compile(r'\]\(([^)\s]+)\)')


def _anchors(path):
    """GitHub's anchors of a Markdown file's headings."""
    with open(path) as f:
        headings = [line.lstrip('#').strip() for line in f if line.startswith('#')]
    return {re.sub(r'[^\w\- ]', '', h.lower()).replace(' ', '-') for h in headings}


def test_readme_is_short_and_starts_with_the_quickstart():
    with open(osp.join(ROOT, 'README.md')) as f:
        lines = f.read().splitlines()
    assert len(lines) <= 150
    headings = [line for line in lines if line.startswith('## ')]
    assert headings[:2] == ['## Quickstart', '## Using the backbone']
    quickstart = '\n'.join(lines[lines.index('## Quickstart'):])
    commands = re.search(r'```bash\n(.*?)```', quickstart, re.S).group(1).splitlines()
    assert [c.split('#')[0].strip() for c in commands] == [
        'bash tools/install.sh demo', 'bash tools/install.sh test']
    # every page of docs/ is linked from the README
    linked = {osp.normpath(link) for link in LINK.findall('\n'.join(lines))}
    assert set(PAGES[1:]) <= linked, set(PAGES[1:]) - linked


@pytest.mark.parametrize('page', PAGES)
def test_relative_links_resolve(page):
    with open(osp.join(ROOT, page)) as f:
        text = f.read()
    links = [link for link in LINK.findall(text) if '://' not in link]
    for link in links:
        target, _, anchor = link.partition('#')
        path = osp.normpath(osp.join(ROOT, osp.dirname(page), target)) if target else \
            osp.join(ROOT, page)
        assert osp.exists(path), f'{page}: {link} leads nowhere'
        if anchor:
            assert anchor in _anchors(path), f'{page}: no heading for #{anchor}'


def test_pages_and_code_describe_what_is_true_now():
    """History belongs in git: no "session N" narratives in the README, docs or package."""
    files = PAGES + sorted(osp.relpath(p, ROOT) for p in glob.glob(
        osp.join(ROOT, 'mmdwnet', '**', '*.py'), recursive=True))
    found = []
    for name in files:
        with open(osp.join(ROOT, name)) as f:
            found += [f'{name}:{i}' for i, line in enumerate(f, 1)
                      if re.search(r'session [0-9]', line, re.I)]
    assert not found, found


def test_every_module_is_under_500_lines():
    sizes = {}
    for path in glob.glob(osp.join(ROOT, 'mmdwnet', '**', '*.py'), recursive=True) + glob.glob(
            osp.join(ROOT, 'tools', '**', '*.py'), recursive=True):
        with open(path) as f:
            sizes[osp.relpath(path, ROOT)] = sum(1 for _ in f)
    assert len(sizes) > 40 and not {k: n for k, n in sizes.items() if n >= 500}, max(
        sizes.items(), key=lambda kv: kv[1])
