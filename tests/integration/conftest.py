import pytest


@pytest.fixture(scope='session')
def xla_cache(tmp_path_factory):
  """One XLA compilation cache for the session's script runs, in pytest's
  temp dir: the scripts share the functions they have in common, and nothing
  is left in a shared place."""
  return tmp_path_factory.mktemp('xla_cache')
