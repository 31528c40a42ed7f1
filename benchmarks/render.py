"""A benchmark's results JSON as Markdown tables, in its results page.

    python -m benchmarks.render JSON [JSON ...]

A JSON names the module that wrote it (`script`). That module's
`tables(data)` lists what to show as `Table`s; `draw(data, path)`, where the
module has it, draws its figure; `TITLE` is its page's title and `PAGE` the
page's name where it is not the JSON's. The page, beside the JSON, is written
by hand: the renderer replaces only the block between `BEGIN` and `END` (the
run's machine, mode, date and settings, then the tables), so the narrative
around it is never rewritten. A page that does not exist yet is started with
its title and figure.
"""

import argparse
from collections.abc import Sequence
import importlib
import json
import pathlib
from typing import NamedTuple

from benchmarks import common

BEGIN = '<!-- tables -->'
END = '<!-- /tables -->'


class Table(NamedTuple):
  """Rows of cells under `columns`; the first `left` columns are aligned
  left, the others (figures) right."""
  columns: Sequence[str]
  rows: Sequence[Sequence[str]]
  title: str = ''
  note: str = ''
  left: int = 1


def markdown(table: Table) -> str:
  lines = [f'## {table.title}', ''] if table.title else []
  if table.note:
    lines += [table.note, '']
  lines += [
      '| ' + ' | '.join(table.columns) + ' |',
      '| ' + ' | '.join('---' if i < table.left else '---:'
                        for i in range(len(table.columns))) + ' |',
  ]
  lines += ['| ' + ' | '.join(map(str, row)) + ' |' for row in table.rows]
  return '\n'.join(lines)


def _cell(value) -> str:
  if isinstance(value, list | tuple):
    return ', '.join(map(_cell, value))
  if isinstance(value, float):
    return f'{value:g}'
  return str(value)


def _flat(config: dict, prefix: str = ''):
  for key, value in config.items():
    if isinstance(value, dict):
      yield from _flat(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', _cell(value)


def block(data: dict, tables: Sequence[Table]) -> str:
  """The rendered part of a page: the run, its settings, its tables."""
  wall = data['wall']
  run = (f'Machine: {data["machine"]}.\n\n'
         f'Mode: {data["mode"]}; run on {data["date"]}; wall time '
         f'{wall:.0f} s ({wall / 60:.1f} min); written by '
         f'`python -m {data["script"]}`.')
  settings = Table(['setting', 'value'], list(_flat(data['config'])),
                   title='Settings', left=2)
  return '\n\n'.join([run, *map(markdown, [settings, *tables])])


def rendered(data: dict) -> str:
  """What `write` puts between the markers of `data`'s page, markers
  included."""
  module = importlib.import_module(data['script'])
  return f'{BEGIN}\n{block(data, module.tables(data))}\n{END}'


def write(data: dict, page) -> pathlib.Path:
  """Writes the tables of `data` (a run's JSON, loaded) into `page`, and its
  figure beside it; returns the page's path."""
  module = importlib.import_module(data['script'])
  page = pathlib.Path(page)
  text = rendered(data)
  figure = hasattr(module, 'draw')
  if figure:
    module.draw(data, page.with_name(f'{module.NAME}.png'))
  if page.exists():
    old = page.read_text()
    start, end = old.find(BEGIN), old.find(END)
    if start < 0 or end < start:
      raise ValueError(f'{page} has no {BEGIN} ... {END} block to replace')
    text = old[:start] + text + old[end + len(END):]
  else:
    image = f'![{module.NAME}]({module.NAME}.png)\n\n' if figure else ''
    text = f'# {module.TITLE}\n\n{image}{text}\n'
  page.write_text(text)
  return page


def page_for(json_path) -> pathlib.Path:
  """The page beside a results JSON: its module's `PAGE`, else the JSON's
  own name."""
  json_path = pathlib.Path(json_path)
  module = importlib.import_module(json.loads(json_path.read_text())['script'])
  return json_path.with_name(f'{getattr(module, "PAGE", json_path.stem)}.md')


def render(json_path, page=None) -> pathlib.Path:
  """Writes the tables of `json_path` into `page` (by default `page_for`
  it); returns the page's path."""
  data = json.loads(pathlib.Path(json_path).read_text())
  return write(data, page or page_for(json_path))


def save(data: dict, json_path, page) -> pathlib.Path:
  """Writes a run's JSON, then renders the page from it, as a re-render
  would; returns the page's path."""
  common.write_json(json_path, data)
  return render(json_path, page)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('json', nargs='+', help='results JSON files')
  for path in parser.parse_args(argv).json:
    print(f'wrote {render(path)}')


if __name__ == '__main__':
  main()
