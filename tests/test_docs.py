"""The documentation is part of the product: its Python blocks run as written, the files it
names exist, and the README stays a page a user reads in one go."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
README_MAX_LINES = 300


def python_blocks(path):
    """(line number, code) of every ```python block of a markdown file."""
    text = path.read_text()
    return [
        (text[: m.start()].count('\n') + 2, m.group(1))
        for m in re.finditer(r'^```python\n(.*?)^```', text, flags=re.M | re.S)
    ]


BLOCKS = [
    pytest.param(path, line, code, id=f'{path.relative_to(ROOT)}:{line}')
    for path in DOCS
    for line, code in python_blocks(path)
]


def test_the_readme_has_python_blocks():
    assert any(p == ROOT / 'README.md' for p, *_ in (b.values for b in BLOCKS))


@pytest.mark.parametrize('path,line,code', BLOCKS)
def test_python_block_runs_as_written(path, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks may write files (net.safetensors, ...)
    exec(compile(code, f'{path.name}:{line}', 'exec'), {'__name__': '__doc_block__'})


def referenced_files(path):
    """Repository files a markdown page names: link targets and `code` spans that look like
    a path to a .md, .py or .sh file."""
    text = path.read_text()
    links = re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', text)
    spans = re.findall(r'`([\w./-]+\.(?:md|py|sh))`', text)
    return [(t, [path.parent / t]) for t in links if not re.match(r'[a-z]+://', t)] + [
        (t, [ROOT / t, ROOT / 'pfgmpp_fast' / t]) for t in spans if '/' in t
    ]


@pytest.mark.parametrize('path', DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_file_exists(path):
    missing = [t for t, places in referenced_files(path) if not any(p.exists() for p in places)]
    assert not missing, f'{path.name} names files that are not in the repository: {missing}'


def test_no_reference_to_a_design_file_outside_the_repository():
    """Every `DESIGN` citation in code and docs resolves to docs/DESIGN.md."""
    offenders = []
    for p in ROOT.rglob('*'):
        if (
            p.suffix not in {'.py', '.md', '.sh', '.txt', '.cpp', '.cu', '.h', '.cuh'}
            or '.git' in p.parts
            or p in (ROOT / 'docs' / 'DESIGN.md', pathlib.Path(__file__).resolve())
        ):
            continue
        for n, line in enumerate(p.read_text(errors='replace').splitlines(), 1):
            if re.search(r'DESIGN(\.md)?\s*§', line) and 'DESIGN.md' not in line.replace('docs/DESIGN.md', 'DESIGN.md'):
                offenders.append(f'{p.relative_to(ROOT)}:{n}')
            elif (
                re.search(r'(?<![\w/])DESIGN\.md', line) and p.parent != ROOT / 'docs' and 'docs/DESIGN.md' not in line
            ):
                offenders.append(f'{p.relative_to(ROOT)}:{n}')
    assert (ROOT / 'docs' / 'DESIGN.md').exists()
    assert not offenders, f'DESIGN citations that do not point at docs/DESIGN.md: {offenders}'


def test_readme_is_short():
    n = len((ROOT / 'README.md').read_text().splitlines())
    assert n <= README_MAX_LINES, f'README.md has {n} lines; move deep sections to docs/ (limit {README_MAX_LINES})'
