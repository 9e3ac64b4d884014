"""Shared pytest configuration.

The tests under ``multidevice/`` need 8 simulated CPU devices, which must be
requested before JAX starts; `test_multidevice.py` runs them in a subprocess
with that setting, so the rest of the suite keeps one device.

The tests under ``maxtext/`` run MaxText's own trainer, which needs Python >=
3.12 and a venv of its own (`bash .ci/maxtext`); they are collected only with
``OPTAX_ZCLIP_MAXTEXT=1``, which that job sets.

``--library-only`` runs the library's tests alone, as CI's job on the
declared floors of jax, optax and numpy does (Flax's releases that the
examples need do not install with those): it leaves out the tests marked
``examples``, which need flax and the examples, and does not even import a
file marked so as a whole (``pytestmark = pytest.mark.examples``), since it
imports flax.

``-m "not slow"`` leaves out the long runs, marked ``slow`` (the
multi-device suites' subprocesses, the property tests' many examples): the
fast set for everyday work. It combines with ``--library-only``.
"""

import fcntl
import os
import pathlib
import pickle

import pytest

collect_ignore = []
if os.environ.get("OPTAX_ZCLIP_MULTIDEVICE") != "1":
  collect_ignore.append("multidevice")
if os.environ.get("OPTAX_ZCLIP_MAXTEXT") != "1":
  collect_ignore.append("maxtext")

_WHOLE_FILE_MARK = "\npytestmark = pytest.mark.examples\n"


def marked_examples(path: pathlib.Path) -> bool:
  """Whether the test file at ``path`` is marked ``examples`` as a whole."""
  return _WHOLE_FILE_MARK in path.read_text()


def pytest_addoption(parser):
  parser.addoption(
      "--library-only", action="store_true",
      help="run the library's tests alone: leave out those marked "
      "`examples` (they need flax and the examples), as CI's floor job does")


def pytest_ignore_collect(collection_path, config):
  if (config.getoption("--library-only") and collection_path.suffix == ".py"
      and collection_path.name.startswith("test_")
      and marked_examples(collection_path)):
    return True
  return None


def pytest_collection_modifyitems(config, items):
  if not config.getoption("--library-only"):
    return
  dropped = [item for item in items if "examples" in item.keywords]
  if dropped:
    config.hook.pytest_deselected(items=dropped)
    items[:] = [item for item in items if "examples" not in item.keywords]


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
