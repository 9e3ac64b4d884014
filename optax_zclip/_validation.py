"""Validation of hyperparameters when a transform is built.

Concrete Python/NumPy values are checked in full; a value that is neither a
real number nor a scalar array (a string, None, a bool, a vector) is rejected.
Under `optax.inject_hyperparams` the factory receives scalar jax arrays (often
tracers), whose values must not be pulled to the host: only their rank and
dtype are checked.

No jitted computation happens here, so the host-side spike metrics use it too.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _concrete(value: Any) -> float | None:
  """A real number or 0-d NumPy array as a float, else None (bools too)."""
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, (numbers.Real, np.integer, np.floating)):
    return float(value)
  if (isinstance(value, np.ndarray) and value.ndim == 0
      and value.dtype.kind in "iuf"):
    return float(value)
  return None


def _jax_scalar(value: Any) -> bool:
  """Whether ``value`` is a real scalar jax array, perhaps a tracer.

  Its value is not read (that would sync with the host, or fail on a
  tracer), but its rank and dtype are static and are checked.
  """
  return (isinstance(value, jax.Array) and value.ndim == 0
          and jnp.dtype(value.dtype).kind in "iuf")


def check_number(name: str, value: Any, ok: Callable[[float], bool],
                 allowed: str) -> None:
  """Raises ``ValueError`` unless ``value`` is a real number that passes ``ok``.

  A scalar jax array (what `optax.inject_hyperparams` passes) is accepted
  without reading its value; anything else that is not a real number (a
  string, None, a bool, an array of rank > 0) is rejected.
  """
  if _jax_scalar(value):
    return
  v = _concrete(value)
  if v is None or not (math.isfinite(v) and ok(v)):
    raise ValueError(f"`{name}` must be {allowed}; got {value!r}.")


def check_int(name: str, value: Any, minimum: int, *,
              static: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` is an integer >= ``minimum``.

  Bools and floats (even integral ones) are rejected; a scalar jax array is
  accepted without reading its value, as in `check_number`, unless
  ``static``: a value that sets a shape must be a Python or NumPy integer.
  """
  if _jax_scalar(value):
    if static:
      raise ValueError(
          f"`{name}` must be a Python int (it sets the state's shape); got a "
          "jax array. With optax.inject_hyperparams pass "
          f"static_args=('{name}',).")
    return
  integral = (
      isinstance(value, (numbers.Integral, np.integer))
      or (isinstance(value, np.ndarray) and value.ndim == 0
          and value.dtype.kind in "iu"))
  if not integral or isinstance(value, (bool, np.bool_)):
    raise ValueError(
        f"`{name}` must be an integer >= {minimum}; got {value!r}.")
  check_number(name, value, lambda v: v >= minimum,
               f"an integer >= {minimum}")


def check_bool(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is a bool (or a 0-d bool array)."""
  if isinstance(value, (bool, np.bool_)):
    return
  if (isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0
      and value.dtype == np.bool_):
    return
  raise ValueError(f"`{name}` must be a bool; got {value!r}.")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
  """Returns ``value`` lower-cased, or raises ``ValueError``."""
  if isinstance(value, str) and value.lower() in choices:
    return value.lower()
  raise ValueError(f"`{name}` must be one of {list(choices)}; got {value!r}.")
