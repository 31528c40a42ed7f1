"""What every benchmark script records: the machine, the run, the JSON.

A script's JSON holds its raw results and `run_info`: the script that wrote
it (the renderer finds its tables there), the mode, the date, the wall time,
the machine and versions, and the settings (`config`).
"""

import datetime
import json
import os
import pathlib
import platform

import jax
import numpy as np
import optax

import fromage_jax

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / 'results'


def versions() -> dict:
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'optax': optax.__version__, 'numpy': np.__version__,
          'fromage_jax': fromage_jax.__version__}


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> str:
  """The machine, in words: device, CPU, cores, load, OS and versions."""
  dev = jax.devices()[0]
  cpu = _cpu_model()
  where = cpu if dev.platform == 'cpu' else f'{dev.device_kind}; host {cpu}'
  try:
    # A busy machine slows the timings; the load says whether it was.
    load = f', load average {os.getloadavg()[0]:.2f}'
  except OSError:
    load = ''
  return (f'{dev.platform} ({where}), {os.cpu_count()} CPU cores{load}; '
          f'{platform.system()} {platform.release()}; '
          + ', '.join(f'{k} {v}' for k, v in versions().items()))


def run_info(script: str, mode: str, wall: float, config: dict) -> dict:
  """The run's metadata; `script` is the module that ran it."""
  return dict(
      script=script, mode=mode,
      date=datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC'),
      wall=wall, machine=machine(), versions=versions(), config=config)


def to_jsonable(obj):
  """Numbers, arrays and nested dicts/lists as plain JSON values."""
  if isinstance(obj, dict):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray | jax.Array | np.generic):
    arr = np.asarray(obj, dtype=float)
    return np.where(np.isfinite(arr), arr, np.nan).tolist()
  return obj


def write_json(path, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(to_jsonable(obj), f, allow_nan=True)
