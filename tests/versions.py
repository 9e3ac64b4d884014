"""Which jaxlib releases the tests that pin XLA's output were measured on.

XLA's HLO text, its cost model and its buffer assignment change between
jaxlib releases, so a test that pins them holds where it was measured and
is skipped elsewhere, saying so (`measured_on`). Only such tests may use
it: a test of behaviour (decisions, values, states, errors) runs on every
release in the supported range.

To extend a range, run the marked tests on the new release and, where they
pass unchanged, move the bound; where the numbers differ, the test needs a
second measurement, not a wider range: its figure per range of releases,
chosen with `between`, each with the reason it moved.

Measured so far: jaxlib 0.10.2 (Python 3.11, CI's README job), and 0.11.0,
0.11.1, 0.11.2, 0.12.0 and 0.12.0.1 (Python 3.13; 0.12.0.1 in CI's
newest-Python job, `.ci/newest`).
"""

from __future__ import annotations

import importlib.metadata
import itertools

import pytest


def _release(version: str) -> tuple[int, ...]:
  # Every numeric part: jaxlib 0.12.0.1 is a release of its own, after 0.12.0.
  return tuple(int(part) for part in
               itertools.takewhile(str.isdigit, version.split(".")))


JAXLIB = importlib.metadata.version("jaxlib")


def between(first: str, last: str) -> bool:
  """Whether the installed jaxlib is ``first`` to ``last``, both included."""
  return _release(first) <= _release(JAXLIB) <= _release(last)


def measured_on(first: str, last: str, what: str) -> pytest.MarkDecorator:
  """Skips the test outside jaxlib ``first`` to ``last`` (both included),
  the releases on which ``what`` (the XLA output it pins) was measured."""
  return pytest.mark.skipif(
      not between(first, last),
      reason=f"pins {what}, measured on jaxlib {first} to {last}; this is "
      f"jaxlib {JAXLIB}, whose XLA differs there (a measurement, not "
      "behaviour: the behaviour is tested on every release)")
