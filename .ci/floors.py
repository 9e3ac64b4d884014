"""Prints the pins of CI's floor job, read from pyproject.toml.

``--library``: each runtime dependency at exactly its declared floor
(``jax>=X`` -> ``jax==X``) and jaxlib at jax's, one per line, for a pip
constraints file. ``--tests``: what the library's tests need besides, from
the ``test`` extra, without flax and equinox (the tests that need them are
marked ``examples`` and left out of the floor job; equinox needs jax >=
0.4.38) and lint. Orbax is pinned to
the release the floor job was measured with: the examples' floor of it
(0.11.17) needs jax >= 0.5, and 0.11.0 is the oldest that restores the
library's states (it fails to import with jax >= 0.7, hence not the
examples' floor).
"""

import pathlib
import re
import sys

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEAVE_OUT = {"flax", "equinox", "ruff"}
MEASURED = {"orbax-checkpoint": "0.11.0"}


def _split(requirement):
  m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(?:>=\s*([^,;\s]+))?\s*",
                   requirement)
  if not m:
    raise SystemExit(f"floors.py: cannot read {requirement!r}")
  return m.group(1), m.group(2)


def library():
  pins = []
  for req in _project()["dependencies"]:
    name, floor = _split(req)
    if floor is None:
      raise SystemExit(f"floors.py: {name} declares no floor")
    pins.append(f"{name}=={floor}")
    if name == "jax":
      pins.append(f"jaxlib=={floor}")
  return pins


def tests():
  out = []
  for req in _project()["optional-dependencies"]["test"]:
    name, floor = _split(req)
    if name in LEAVE_OUT:
      continue
    out.append(f"{name}=={MEASURED[name]}" if name in MEASURED else req)
  return out


def _project():
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


if __name__ == "__main__":
  which = {"--library": library, "--tests": tests}.get(sys.argv[-1])
  if len(sys.argv) != 2 or which is None:
    raise SystemExit("usage: floors.py --library | --tests")
  print("\n".join(which()))
