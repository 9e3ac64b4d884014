"""Norms `skip_spikes` measured, handed to the clip at the head of its chain.

`skip_spikes` measures the per-leaf norms of the updates for its own test,
then traces the optimizer it wraps on the same arrays. A clip at the head of
that optimizer (`zclip`, `adagc`, `autoclip`, `clip_by_global_norm`) would
trace its own overflow-safe pass over the same leaves; XLA merges the two in
the end, but only after its passes have compiled both (the Performance
guide's Compile time section). So the clips
measure their norms here: inside `offered` for these very arrays (``is``)
and the same ``axis_name``, they get the norms `skip_spikes` measured, the
same values by construction; anywhere else, `_numerics` measures them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax

from optax_zclip import _numerics
from optax_zclip._numerics import AxisName

# The norms offered in the trace being built: (leaves, axis_name, norms)
# per thread, innermost last.
_offers = threading.local()


def _offered() -> list[tuple[list[Any], AxisName, list[jax.Array]]]:
  if not hasattr(_offers, "entries"):
    _offers.entries = []
  return _offers.entries


def _same(a: Sequence[Any], b: Sequence[Any]) -> bool:
  return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


@contextlib.contextmanager
def offered(tree: Any, axis_name: AxisName, norms: list[jax.Array]
            ) -> Iterator[None]:
  """Within the block, `leaf_norm_list` of the leaves of ``tree`` with
  ``axis_name`` is ``norms``."""
  entries = _offered()
  entries.append((jax.tree.leaves(tree), axis_name, list(norms)))
  try:
    yield
  finally:
    entries.pop()


@contextlib.contextmanager
def carried(old_leaves: Sequence[Any], new_leaves: Sequence[Any]
            ) -> Iterator[None]:
  """Within the block, the norms offered for ``old_leaves`` hold for
  ``new_leaves`` too: for a function traced again (into a jaxpr, by
  `_select`) with new arrays standing for the same values."""
  entries = _offered()
  carry = [(list(new_leaves), name, norms)
           for leaves, name, norms in entries if _same(leaves, old_leaves)]
  entries.extend(carry)
  try:
    yield
  finally:
    del entries[len(entries) - len(carry):]


def leaf_norm_list(tree: Any, axis_name: AxisName = None) -> list[jax.Array]:
  """The norms offered for these leaves, else `_numerics.leaf_norm_list`'s.

  Raises:
    ValueError: if a leaf is not floating point (checked either way).
  """
  leaves = _numerics.check_float_leaves(tree)
  for known, name, norms in reversed(_offered()):
    if name == axis_name and _same(known, leaves):
      return list(norms)
  return _numerics.leaf_norm_list(tree, axis_name)


def global_norm(tree: Any, axis_name: AxisName = None) -> jax.Array:
  """`_numerics.global_norm` from the norms of `leaf_norm_list`."""
  return _numerics.norm_of_norms(
      _numerics.stack_norms(leaf_norm_list(tree, axis_name)))
