"""Import-path setup only: lets test files do `from tests.tree_asserts import ...`."""

import pathlib
import sys

_ROOT = str(pathlib.Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
