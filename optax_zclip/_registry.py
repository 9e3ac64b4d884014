"""The telemetry registry: which state classes `stats` reports, and how.

A transform declares its state here with `loggable_state` when its module is
imported; the reader (`_stats`) walks an optimizer state and asks the
registry about each node it meets. A transform therefore imports this
module, never the reader, and a new transform edits neither.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple, TypeVar

import jax

Derived = Callable[[Mapping[str, jax.Array]], jax.Array]
_StateT = TypeVar("_StateT", bound=type)


class Telemetry(NamedTuple):
  """What `stats` reports for one declared state class."""

  name: str
  fields: tuple[str, ...]
  derived: tuple[tuple[str, Derived], ...]


# Every declared state class, in declaration order. Filled by
# `loggable_state` when a transform's module is imported.
DECLARED: dict[type, Telemetry] = {}


def loggable_state(name: str, fields: tuple[str, ...],
                   derived: Mapping[str, Derived] | None = None
                   ) -> Callable[[_StateT], _StateT]:
  """Class decorator: declares which fields of a state `stats` reports.

  Put it on the ``NamedTuple`` state of a transform to make `stats` find that
  state anywhere in an optimizer state and log it; nothing else needs to
  know about the transform (:ref:`telemetry-own-transform`).

  Args:
    name: the state's kind, a short name that prefixes every key `stats`
      reports for it (``"zclip"`` gives ``"zclip/grad_norm"``); non-empty,
      without ``/``, ``[`` or ``]``, and not the kind of another declared
      state.
    fields: the state's fields that are scalars worth logging every step
      (per-tensor and buffer fields are left out).
    derived: extra values computed from the declared fields, as a mapping
      from key to a function of the mapping of those fields to their values
      (``{"std": lambda s: jnp.sqrt(s["var"])}``).

  Returns:
    The decorator, which returns the class unchanged after registering it.

  Raises:
    ValueError: if ``name`` is not a valid kind or is another declared
      state's, a field is not one of the class's fields, a derived key
      repeats a field, or another declared state has the same field names
      (`stats` could not tell the two apart once ``nnx.state`` has turned
      them into mappings).

  Example:
    >>> from typing import NamedTuple
    >>> import jax, jax.numpy as jnp, optax_zclip
    >>> @optax_zclip.loggable_state("myclip", fields=("grad_norm",))
    ... class MyClipState(NamedTuple):
    ...   grad_norm: jax.Array
    ...   my_private_buffer: jax.Array
    >>> s = optax_zclip.stats({"opt": MyClipState(jnp.array(1.5), 0.0)})
    >>> {k: float(v) for k, v in s.items()}
    {'myclip/grad_norm': 1.5}

  References:
    The fields follow what large JAX trainers log every step from their
    optimizer state (the pre-clip norm, the threshold, whether the step was
    clipped or skipped): Levanter (https://github.com/stanford-crfm/levanter)
    and MaxText (https://github.com/AI-Hypercomputer/maxtext).
  """
  derived = dict(derived or {})
  if (not isinstance(name, str) or not name
      or any(c in name for c in "/[]")):
    raise ValueError("`name` must be a non-empty string without '/', '[' or "
                     f"']'; got {name!r}.")

  def declare(cls: _StateT) -> _StateT:
    own = tuple(getattr(cls, "_fields", ()))
    unknown = [f for f in fields if f not in own]
    if unknown:
      raise ValueError(f"`fields` {unknown} are not fields of {cls.__name__} "
                       f"({list(own)}).")
    clash = sorted(set(derived) & set(fields))
    if clash:
      raise ValueError(f"`derived` keys {clash} repeat fields.")
    for other in list(DECLARED):
      if (other.__module__, other.__qualname__) == (cls.__module__,
                                                    cls.__qualname__):
        del DECLARED[other]  # The same class again (a module reloaded).
      elif DECLARED[other].name == name:
        raise ValueError(
            f"`name` {name!r} is already the kind of {other.__name__}; "
            "stats() keys would collide.")
      elif set(other._fields) == set(own):
        raise ValueError(
            f"{cls.__name__} has the same fields as {other.__name__}; "
            "stats() could not tell them apart in an nnx.state mapping.")
    DECLARED[cls] = Telemetry(name, tuple(fields), tuple(derived.items()))
    return cls

  return declare
