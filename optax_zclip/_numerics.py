"""The numeric core every transform shares: float32 norms, scales, counters.

Every clipping rule in this package is "measure some L2 norms, then multiply the
updates by a scalar". The measuring and the multiplying live here, once, so that
the float32 accumulation, the cross-device ``psum`` and the dtype rules are the
same for all of them. Argument checking lives in `_validation`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
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


def scalar(value: jax.typing.ArrayLike, dtype: Any = F32) -> jax.Array:
  """A new 0-d array holding ``value``: one per state field, never shared.

  A training step that donates the optimizer state (``jax.jit(...,
  donate_argnums=...)``, ``nnx.jit``) fails with "Attempt to donate the same
  buffer twice" if two fields of a fresh state are one array object, so
  every ``init`` builds each field with its own call.
  """
  return jnp.full([], value, dtype)
