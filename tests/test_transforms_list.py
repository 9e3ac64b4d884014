"""The list of transforms (transforms.py) leaves none out.

`TRANSFORMS` must list every public factory that returns a
`GradientTransformation`, and every suite that must hold for all
transforms must run each of its entries, so that a new transform is tested
everywhere as soon as it is listed.
"""

import importlib.util
import inspect
import pathlib
import sys

import pytest
from transforms import CLIPPERS, FACTORIES

import optax_zclip


def test_the_catalog_covers_every_public_transform():
  public = {name for name in optax_zclip.__all__
            if inspect.isfunction(getattr(optax_zclip, name))
            and "GradientTransformation" in str(
                inspect.signature(getattr(optax_zclip, name))
                .return_annotation)}
  assert public == FACTORIES


# The suites that must hold for every transform, run over the registry: each
# runs every clipping entry (CLIPPERS) at least, parametrized by "name" or by
# "case", and so every transform added to the registry. (test_stats.py runs
# them too, but declares a state class of its own, which loading the file
# again here would declare twice.)
REGISTRY_SUITES = [
    "test_overflow.py", "test_odd_trees.py", "test_properties.py",
    "test_long_runs.py", "test_composition.py", "test_checkpoint.py",
    "test_donation.py", "test_errors.py", "test_hlo.py",
    "multidevice/test_sharded.py",
    "multidevice/test_overflow_sharded.py",
    "multidevice/test_donation_sharded.py",
    # Imports flax: with the examples' tests.
    pytest.param("test_nnx.py", marks=pytest.mark.examples)]


@pytest.mark.parametrize("path", REGISTRY_SUITES)
def test_each_registry_suite_runs_every_entry(path):
  here = pathlib.Path(__file__).resolve().parent
  # Loaded afresh under a name of its own (the multi-device files are not
  # collected in this process); nothing runs but their definitions.
  name = "_suite_" + path.replace("/", "_")[:-3]
  spec = importlib.util.spec_from_file_location(name, here / path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # for its dataclasses
  try:
    spec.loader.exec_module(module)
  finally:
    del sys.modules[name]
  names = set()
  for obj in vars(module).values():
    for mark in getattr(obj, "pytestmark", []):
      if mark.name == "parametrize" and mark.args[0] in ("name", "case"):
        names.update(mark.args[1])
  missing = set(CLIPPERS) - names
  assert not missing, f"{path} does not run {sorted(missing)}"
