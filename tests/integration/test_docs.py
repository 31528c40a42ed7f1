"""The docs site builds with warnings as errors and shows what it claims.

One build (`python -m sphinx -W`, about 10 s) into pytest's temporary folder
serves every test; the notebooks are rendered from their stored outputs.
"""

import html
import pathlib
import re
import subprocess
import sys

import pytest

import fromage_jax
from tests.helpers import ROOT

DOCS = ROOT / 'docs'
RESULTS_MARKER = re.compile(r'^```\{results-file\} (\S+)\n```\n', re.M)
# A figure: a number with a decimal point or an exponent (not "figure 3").
FIGURE = re.compile(r'(?<![\w.])\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![\w.]*\d)')


def figures(text: str) -> set[str]:
  return {f for f in FIGURE.findall(text) if '.' in f or 'e' in f}


def page_text(path: pathlib.Path) -> str:
  """The visible text of a built page (tags dropped, entities decoded)."""
  body = re.sub(r'<(script|style)\b.*?</\1>', ' ', path.read_text(), flags=re.S)
  return html.unescape(re.sub(r'<[^>]+>', ' ', body))


def squash(text: str) -> str:
  """Text without whitespace, to compare across tags and line breaks."""
  return re.sub(r'\s+', '', text)


def results_pages() -> dict[str, str]:
  """Each results page's name and the results file it is generated from."""
  pages = {}
  for page in sorted((DOCS / 'results').glob('*.md')):
    found = RESULTS_MARKER.search(page.read_text())
    if found:
      pages[page.stem] = found.group(1)
  return pages


@pytest.fixture(scope='module')
def site(tmp_path_factory):
  out = tmp_path_factory.mktemp('docs') / 'html'
  proc = subprocess.run(
      [sys.executable, '-m', 'sphinx', '-W', '-q', '-b', 'html', str(DOCS),
       str(out)],
      capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return out


def test_api_page_documents_every_public_name(site):
  page = (site / 'api.html').read_text()
  for name in fromage_jax.__all__:
    assert f'id="fromage_jax.{name}"' in page, name


def test_api_page_documents_the_testing_reference_when_it_exists(site):
  from fromage_jax import testing  # noqa: PLC0415
  page = (site / 'api.html').read_text()
  for name in getattr(testing, '__all__', ()):
    assert f'id="fromage_jax.testing.{name}"' in page, name


def test_api_page_shows_the_docstring_examples(site):
  text = page_text(site / 'api.html')
  for name in fromage_jax.__all__:
    doc = getattr(fromage_jax, name).__doc__ or ''
    examples = [line.strip() for line in doc.splitlines()
                if line.strip().startswith('>>> ')]
    for line in examples:
      assert squash(line) in squash(text), (name, line)


def test_spec_page_is_the_contract(site):
  text = page_text(site / 'spec.html')
  for heading in ('Behaviour contract', 'The update', 'Edge cases',
                  'Stacked layers and sharding'):
    assert heading in text
  assert '(zero-initialised bias)' in text


def test_every_results_file_has_a_page():
  shown = set(results_pages().values())
  for path in sorted((ROOT / 'benchmarks' / 'results').glob('*.md')):
    assert str(path.relative_to(ROOT)) in shown, path.name


@pytest.mark.parametrize('page', sorted(results_pages()))
def test_results_page_holds_its_files_figures_and_provenance(site, page):
  source = ROOT / results_pages()[page]
  text = source.read_text()
  shown = page_text(site / 'results' / f'{page}.html')
  missing = figures(text) - figures(shown)
  assert not missing, sorted(missing)[:10]
  machine = re.search(r'^(?:Machine|Device): (.*?)[;.]', text, re.M)
  if machine:
    # In the note on the file's provenance, and in the file itself.
    assert squash(shown).count(squash(machine.group(1))) >= 2
  assert re.search(r'last commit(?:ted)? on \d{4}-\d\d-\d\d|not committed',
                   shown)
  for image in re.findall(r'!\[[^]]*\]\(([^)]+)\)', text):
    assert (site / '_images' / pathlib.Path(image).name).is_file(), image


@pytest.mark.parametrize('page', sorted(results_pages()))
def test_results_page_prose_quotes_only_its_files_figures(page):
  prose = RESULTS_MARKER.sub('', (DOCS / 'results' / f'{page}.md').read_text())
  source = (ROOT / results_pages()[page]).read_text()
  assert not figures(prose) - figures(source)


@pytest.mark.parametrize('name', ['quickstart', 'paper_figures'])
def test_notebooks_are_rendered_with_their_stored_outputs(site, name):
  page = (site / 'notebooks' / f'{name}.html').read_text()
  assert re.search(r'<img [^>]*src="[^"]*_images/[^"]+\.png"', page)
  assert 'cell_output' in page


def guide_snippets():
  for path in sorted((DOCS / 'guides').glob('*.md')):
    blocks = re.findall(r'^( *)```python\n(.*?)^\1```', path.read_text(),
                        re.S | re.M)
    for i, (indent, code) in enumerate(blocks):
      code = '\n'.join(line.removeprefix(indent) for line in code.split('\n'))
      yield pytest.param(code, id=f'{path.stem}-{i}')


@pytest.mark.parametrize('code', list(guide_snippets()))
def test_guide_snippet_runs(code, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a snippet that writes (checkpoints) writes here
  exec(compile(code, 'snippet', 'exec'), {})  # noqa: S102
