"""Sphinx configuration for the fromage_jax docs.

Build offline from the repository root:
`python -m sphinx -W -b html docs docs/_build/html`.
"""

import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # the package, without installing it
sys.path.insert(0, str(DOCS / '_ext'))

import fromage_jax  # noqa: E402

project = 'fromage_jax'
author = 'the fromage_jax authors'
copyright = 'the fromage_jax authors'  # noqa: A001
release = version = fromage_jax.__version__

extensions = [
    'myst_nb',  # Markdown pages (it loads myst_parser) and notebooks
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'fromage_docs',  # the API page and the results pages, at build time
]

exclude_patterns = ['_build', '_results', 'Thumbs.db', '.DS_Store']

autodoc_member_order = 'bysource'
# The docstrings say what each argument takes; the annotations would print
# optax's aliases expanded (ScalarOrSchedule as a dozen-type union).
autodoc_typehints = 'none'
autodoc_default_options = {'show-inheritance': False}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False

myst_enable_extensions = ['colon_fence', 'dollarmath']
myst_heading_anchors = 3
# The notebooks are rendered with the outputs they are committed with; their
# test (tests/test_notebooks.py) checks that those outputs are complete and
# that the notebooks still run.
nb_execution_mode = 'off'

# The results files in benchmarks/results/ are written by their scripts, not
# for Sphinx: some skip heading levels (a '#' title, then '###' per depth).
suppress_warnings = ['myst.header']

html_theme = 'sphinx_book_theme'
html_title = 'fromage_jax'
html_theme_options = {
    'show_toc_level': 2,
    'navigation_with_keys': False,
}
