"""Which jaxlib releases the tests that pin XLA's output were measured on.

XLA's HLO text, its cost model and its buffer assignment change between
jaxlib releases, so a test that pins them holds where it was measured and
is skipped elsewhere, saying so (`measured_on`). Only such tests may use
it: a test of behaviour (decisions, values, states, errors) runs on every
release in the supported range.

To extend a range, run the marked tests on the new release and, where they
pass unchanged, move the bound; where the numbers differ, the test needs a
second measurement, not a wider range.
"""

from __future__ import annotations

import importlib.metadata

import pytest


def _release(version: str) -> tuple[int, ...]:
  return tuple(int(part) for part in version.split(".")[:3])


JAXLIB = importlib.metadata.version("jaxlib")


def measured_on(first: str, last: str, what: str) -> pytest.MarkDecorator:
  """Skips the test outside jaxlib ``first`` to ``last`` (both included),
  the releases on which ``what`` (the XLA output it pins) was measured."""
  inside = _release(first) <= _release(JAXLIB) <= _release(last)
  return pytest.mark.skipif(
      not inside,
      reason=f"pins {what}, measured on jaxlib {first} to {last}; this is "
      f"jaxlib {JAXLIB}, whose XLA differs there (a measurement, not "
      "behaviour: the behaviour is tested on every release)")
