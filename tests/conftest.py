"""Shared pytest configuration.

The tests under ``multidevice/`` need 8 simulated CPU devices, which must be
requested before JAX starts; `test_multidevice.py` runs them in a subprocess
with that setting, so the rest of the suite keeps one device.
"""

import fcntl
import os
import pickle

import pytest

if os.environ.get("OPTAX_ZCLIP_MULTIDEVICE") != "1":
  collect_ignore = ["multidevice"]


@pytest.fixture(scope="session")
def spike_demo_run(tmp_path_factory):
  """The tiny spike demo of `test_spike_demo.TINY`: ``(out, summary, rows)``.

  Run once per test session and shared by `test_spike_demo.py` and
  `test_replay.py` (which replays its logged norms); nothing may write to it.
  Under pytest-xdist the workers share one run: the first to ask makes it,
  under a lock, in the temporary directory all workers share.
  """
  import test_spike_demo as demo  # noqa: PLC0415 (flax, only when asked)
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the base all workers' directories sit in
  out = root / "spike_demo_run"
  with open(root / "spike_demo_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (out / "summary.pickle").exists():
      out.mkdir(exist_ok=True)
      summary = demo.spike_demo.main(demo.TINY + ["--out", str(out)])
      (out / "summary.pickle").write_bytes(pickle.dumps(summary))
  summary = pickle.loads((out / "summary.pickle").read_bytes())
  return out, summary, demo._rows(out)
