"""Shared pytest configuration.

The tests under ``multidevice/`` need 8 simulated CPU devices, which must be
requested before JAX starts; `test_multidevice.py` runs them in a subprocess
with that setting, so the rest of the suite keeps one device.
"""

import os

import pytest

if os.environ.get("OPTAX_ZCLIP_MULTIDEVICE") != "1":
  collect_ignore = ["multidevice"]


@pytest.fixture(scope="session")
def spike_demo_run(tmp_path_factory):
  """The tiny spike demo of `test_spike_demo.TINY`: ``(out, summary, rows)``.

  Run once per session and shared by `test_spike_demo.py` and
  `test_replay.py` (which replays its logged norms); nothing may write to it.
  """
  import test_spike_demo as demo  # noqa: PLC0415 (flax, only when asked)
  out = tmp_path_factory.mktemp("demo")
  summary = demo.spike_demo.main(demo.TINY + ["--out", str(out)])
  return out, summary, demo._rows(out)
