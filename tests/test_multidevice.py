"""Runs ``tests/multidevice`` in subprocesses with 8 simulated CPU devices.

JAX fixes its device count when it starts, and the rest of this suite runs on
one device, so the multi-device tests get processes of their own: one per
file, so that pytest-xdist can run them beside the rest of the suite.
"""

import os
import pathlib
import subprocess
import sys

import meshes
import pytest
from conftest import marked_examples

HERE = pathlib.Path(__file__).resolve().parent
FILES = [pytest.param(p.name, marks=[pytest.mark.examples]
                      if marked_examples(p) else [])
         for p in sorted((HERE / "multidevice").glob("test_*.py"))]


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_multidevice_suite_on_8_simulated_devices(name):
  env = dict(os.environ, OPTAX_ZCLIP_MULTIDEVICE="1", JAX_PLATFORMS="cpu",
             XLA_FLAGS=meshes.xla_flags())
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       "-n", "0", str(HERE / "multidevice" / name)],
      cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
  assert " passed" in proc.stdout and "skipped" not in proc.stdout
