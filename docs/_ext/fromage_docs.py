"""Pages generated at build time, so they follow the code and the results.

- ```` ```{fromage-api} ```` becomes the API reference of every name in
  `fromage_jax.__all__`, grouped by the module that defines it, and of
  `fromage_jax.testing` when that module exists.
- ```` ```{results-file} PATH ```` (a results file's path from the
  repository root) becomes a note on where the file came from (the machine
  and version lines it holds, the date it was last committed) followed by
  the file itself, as a section of the page.
- ```` ```{results-index} ```` becomes a list of the results pages named in
  the front page's toctree: each one's file, machine and date.

The docstrings write code Markdown-style, in single backticks, which
reStructuredText reads as interpreted text (and rejects when the code ends in
a space, as in `params -> `): `autodoc-process-docstring` turns those spans
into inline literals.

The markers are rewritten in Sphinx's `source-read` event: an unknown directive is
an error under `-W`, so a page whose marker is not replaced fails the build.
"""

import datetime
import importlib
import inspect
import os
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]

API_MARKER = re.compile(r'^```\{fromage-api\}\n```\n', re.M)
RESULTS_MARKER = re.compile(r'^```\{results-file\} (\S+)\n```\n', re.M)
INDEX_MARKER = re.compile(r'^```\{results-index\}\n```\n', re.M)
# The first sentence of each line of a results file that names the machine or
# the versions it was measured with.
PROVENANCE = re.compile(
    r'^(?:Machine:|Device:|.*\bjax \d).*?(?:\.(?= [A-Z])|$)', re.M)

# Section titles for the modules of `fromage_jax._src`, in the page's order;
# a module not listed here gets a section under its own name (after these), so
# a new module still shows.
SECTIONS = {
    'alias': 'Optimizers',
    'plateau': 'Optimizers',
    'transform': 'Transforms',
    'stacking': 'Stacked layers',
    'diagnostics': 'Diagnostics: the paper\'s distance',
}
CLASSES = 'State types'


def _section(obj) -> str:
  if inspect.isclass(obj):
    return CLASSES
  module = getattr(obj, '__module__', '') or ''
  return SECTIONS.get(module.rsplit('.', 1)[-1], module)


def api_reference() -> str:
  """The API page's body: a summary table, then every public name."""
  package = importlib.import_module('fromage_jax')
  groups: dict[str, list[str]] = {}
  for name in package.__all__:
    groups.setdefault(_section(getattr(package, name)), []).append(name)
  titles = list(dict.fromkeys(SECTIONS.values()))
  order = sorted(groups, key=lambda s: (
      s == CLASSES, titles.index(s) if s in titles else len(titles), s))
  lines = ['.. currentmodule:: fromage_jax', '', '.. autosummary::', '']
  lines += [f'   {name}' for s in order for name in groups[s]]
  for title in order:
    lines += ['', title, '-' * len(title), '']
    for name in groups[title]:
      kind = 'autoclass' if title == CLASSES else 'autofunction'
      lines += [f'.. {kind}:: {name}', '']
  try:
    importlib.import_module('fromage_jax.testing')
  except ModuleNotFoundError:
    pass
  else:
    title = '``fromage_jax.testing``: the float64 reference'
    lines += ['', title, '-' * len(title), '',
              '.. automodule:: fromage_jax.testing', '   :members:', '']
  return '```{eval-rst}\n' + '\n'.join(lines) + '\n```\n'


def _git(*args: str) -> subprocess.CompletedProcess | None:
  try:
    return subprocess.run(['git', *args], cwd=ROOT, capture_output=True,
                          text=True, check=False, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None


def _last_commit_date(path: pathlib.Path) -> str:
  log = _git('log', '-1', '--format=%cs', '--', str(path))
  date = log.stdout.strip() if log and log.returncode == 0 else ''
  if date:
    diff = _git('diff', '--quiet', 'HEAD', '--', str(path))
    changed = diff is not None and diff.returncode == 1
    return (f'modified since its last commit on {date}' if changed
            else f'last committed on {date}')
  # Outside a git checkout, or a file not committed yet.
  mtime = datetime.date.fromtimestamp(path.stat().st_mtime)
  return f'not committed; written on {mtime.isoformat()}'


def provenance(path: pathlib.Path) -> list[str]:
  text = path.read_text()
  return list(dict.fromkeys(m.group(0) for m in PROVENANCE.finditer(text)))


def _as_section(text: str, rel: str) -> str:
  """A results file's Markdown, made to sit under the page's own title.

  The file's title is dropped and its other headings go one level down;
  images are found relative to the file; a `|` inside a code span of a table
  row (`||W||`) is escaped, as GitHub's tables need too, so that it does not
  split the cell.
  """
  lines = text.splitlines()
  if lines and lines[0].startswith('# '):
    lines = lines[1:]
  out, fenced = [], False
  for line in lines:
    if line.startswith('```'):
      fenced = not fenced
    elif not fenced and re.match(r'#+ ', line):
      line = '#' + line
    elif not fenced and line.startswith('|'):
      line = re.sub(r'`[^`]*`',
                    lambda m: re.sub(r'(?<!\\)\|', r'\\|', m.group(0)), line)
    out.append(line)
  body = '\n'.join(out)
  return re.sub(r'!\[([^]]*)\]\((?!\w+://)([^)]+)\)',
                lambda m: f'![{m.group(1)}]({rel}/{m.group(2)})', body)


def results_block(name: str, docdir: pathlib.Path) -> str:
  path = ROOT / name
  where = '\n'.join(f'- {line}' for line in provenance(path))
  rel = os.path.relpath(path.parent, docdir)
  return (
      ':::{admonition} Source\n:class: note\n'
      f'Generated from `{name}` at build time, '
      f'{_last_commit_date(path)}.\n\n'
      f'{where}\n'
      ':::\n\n'
      f'{_as_section(path.read_text(), rel)}\n'
  )


def results_index(srcdir: pathlib.Path) -> str:
  """A list of the results pages: each one's file, date and machine."""
  pages = re.findall(r'^results/(\w+)$', (srcdir / 'index.md').read_text(),
                     re.M)
  items = []
  for page in pages:
    found = RESULTS_MARKER.search(
        (srcdir / 'results' / f'{page}.md').read_text())
    if found:
      path = ROOT / found.group(1)
      items.append(f'- {{doc}}`{page}`: `{found.group(1)}`, '
                   f'{_last_commit_date(path)}; '
                   f"{provenance(path)[0].split(': ', 1)[-1]}")
  return '\n'.join(items) + '\n'


# A single-backtick span that is not a role (:func:`x`), a link (`x <url>`_)
# or a double-backtick literal.
CODE_SPAN = re.compile(r'(?<![`:\w])`([^`]+)`(?![`_\w])')


def _literal_code(app, what, name, obj, options, lines):
  text = CODE_SPAN.sub(lambda m: f'``{m.group(1).strip()}``', '\n'.join(lines))
  lines[:] = text.split('\n')


def _source_read(app, docname, source):
  docdir = (pathlib.Path(app.srcdir) / docname).parent
  text = API_MARKER.sub(lambda _: api_reference(), source[0])
  text = RESULTS_MARKER.sub(lambda m: results_block(m.group(1), docdir), text)
  text = INDEX_MARKER.sub(
      lambda _: results_index(pathlib.Path(app.srcdir)), text)
  source[0] = text


def setup(app):
  app.connect('source-read', _source_read)
  app.connect('autodoc-process-docstring', _literal_code)
  return {'parallel_read_safe': True, 'parallel_write_safe': True}
