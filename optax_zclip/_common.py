"""Shared machinery of every transform: float32 norms, scaling, validation.

Every clipping rule in this package is "measure some L2 norms, then multiply the
updates by a scalar". The measuring and the multiplying live here, once, so that
the float32 accumulation, the cross-device ``psum`` and the dtype rules are the
same for all of them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

# A mesh axis name, or a tuple of them, as accepted by `jax.lax.psum`.
AxisName = Union[Hashable, Sequence[Hashable], None]

F32 = jnp.float32


def _leaf_sq_sum(x: jax.Array) -> jax.Array:
  # Square in float32: bf16/f16 squares lose most of their mantissa and f16
  # overflows above 256, and a low-precision sum over millions of elements
  # drifts far from the true value.
  x = jnp.asarray(x)
  if jnp.iscomplexobj(x):
    x = jnp.abs(x)
  x = x.astype(F32)
  return jnp.sum(x * x)


def _psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
  if axis_name is None:
    return x
  return jax.lax.psum(x, axis_name)


def global_norm(tree: Any, axis_name: AxisName = None) -> jax.Array:
  """Float32 L2 norm of all leaves of ``tree`` together.

  With ``axis_name`` the local squared sum is summed over that mesh axis before
  the square root, so each device may hold only a slice of the gradients.
  An empty tree has norm 0.
  """
  leaves = jax.tree.leaves(tree)
  sq = sum((_leaf_sq_sum(x) for x in leaves), jnp.zeros([], F32))
  return jnp.sqrt(_psum(sq, axis_name))


def leaf_sq_sums(leaves: Sequence[jax.Array],
                 axis_name: AxisName = None) -> jax.Array:
  """Float32 squared L2 norm of each array in ``leaves``, as one vector.

  With ``axis_name`` all the per-leaf sums travel in a single ``psum``.
  """
  if not leaves:
    return jnp.zeros([0], F32)
  return _psum(jnp.stack([_leaf_sq_sum(x) for x in leaves]), axis_name)


def clip_scale(norm: jax.Array, limit: jax.Array,
               eps: jax.typing.ArrayLike = 0.0) -> jax.Array:
  """The factor that brings a global ``norm`` down to ``limit``.

  ``limit / (norm + eps)`` when ``norm > limit``, else 1; also 1 for a NaN or
  Inf ``norm``, so that a non-finite update passes through untouched (for
  `optax.apply_if_finite` to see) instead of being zeroed.
  """
  clip = jnp.isfinite(norm) & (norm > limit)
  return jnp.where(clip, limit / jnp.where(clip, norm + eps, 1.0), 1.0)


def increment_where(flag: jax.Array, counter: jax.Array) -> jax.Array:
  """``counter + 1`` where ``flag`` holds (saturating at the dtype's max)."""
  return jnp.where(flag, optax.safe_increment(counter), counter)


def scale_leaf(x: jax.Array, scale: jax.Array) -> jax.Array:
  """``x * scale`` for a float32 scalar ``scale``, keeping ``x``'s dtype.

  The product is formed in at least float32 (a bf16 copy of the scale would
  round it to 8 bits) and cast back; XLA fuses the casts and the multiply into
  the consumer's elementwise pass.
  """
  x = jnp.asarray(x)
  wide = jnp.promote_types(x.dtype, F32)
  return (x.astype(wide) * scale.astype(wide)).astype(x.dtype)


def scale_tree(tree: Any, scale: jax.Array) -> Any:
  """Multiplies every leaf of ``tree`` by one float32 scalar (`scale_leaf`)."""
  return jax.tree.map(lambda x: scale_leaf(x, scale), tree)


def as_f32(x: jax.typing.ArrayLike) -> jax.Array:
  """A hyperparameter as a float32 array (the statistics are float32)."""
  return jnp.asarray(x, F32)


# ---------------------------------------------------------------------------
# Validation of hyperparameters at build time.
#
# Concrete Python/NumPy values are checked in full; a value that is neither
# a real number nor a scalar array (a string, None, a bool, a vector) is
# rejected.
# Under `optax.inject_hyperparams` the factory receives scalar jax arrays
# (often tracers), whose values must not be pulled to the host: only their
# rank and dtype are checked.


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
