"""The numeric core every transform shares: float32 norms, scales, counters.

Every clipping rule in this package is "measure some L2 norms, then multiply the
updates by a scalar". The measuring and the multiplying live here, once, so that
the float32 accumulation, the cross-device ``psum`` and the dtype rules are the
same for all of them. Argument checking lives in `_validation`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_zclip import _compat

# A mesh axis name, or a tuple of them, as accepted by `jax.lax.psum`.
AxisName = Hashable | Sequence[Hashable] | None

F32 = jnp.float32


# The largest float32: a norm that would overflow float32 is reported as this
# (see `global_norm`).
F32_MAX = float(jnp.finfo(F32).max)

# The pass that recomputes a norm whose float32 sum of squares overflowed
# multiplies every element by 2**-88 first. A power of two, so the product
# is exact; a finite float32 element (below 2**128) then squares to below
# 2**80, so up to 2**48 of them sum without overflow, and an Inf element
# stays Inf. That pass runs only when the norm is at least 2**64 (its square
# overflowed), so the elements whose scaled squares underflow (below 2**25
# before scaling) are at most 2**-78 of the squared norm each: nothing.
_RESCALE_LOG2 = 88


def check_float_leaves(tree: Any) -> list[jax.Array]:
  """The leaves of ``tree``, after checking that each is floating point.

  An integer or bool leaf (or JAX's ``float0``, what `jax.grad` gives for
  integer inputs) is no gradient, and scaling it would truncate it, so it is
  refused when the update is traced (dtypes are static: no host sync).

  Raises:
    ValueError: naming the first such leaf's path and dtype.
  """
  leaves_with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, x in leaves_with_paths:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
      where = jax.tree_util.keystr(path) or "(the root)"
      name = "float0" if dtype == jax.dtypes.float0 else dtype.name
      raise ValueError(
          "the updates must be floating-point (or complex) arrays; the leaf "
          f"at {where} has dtype {name}. An integer or bool leaf has no "
          "gradient: leave it out of the tree passed to the transform (for "
          "example with optax.masked).")
  return [x for _, x in leaves_with_paths]


def _real_f32(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  if jnp.iscomplexobj(x):
    x = jnp.abs(x)
  return x.astype(F32)


def _leaf_sq_sum(x: jax.Array) -> jax.Array:
  # Square in float32: bf16/f16 squares lose most of their mantissa and f16
  # overflows above 256, and a low-precision sum over millions of elements
  # drifts far from the true value. XLA fuses the cast, the square and the
  # sum into one read of ``x``.
  #
  # The barrier keeps that fusion private. Without it XLA's common
  # subexpression elimination merges this cast or square with the same
  # operation elsewhere in the step (AdamW's ``g ** 2`` when nothing scales
  # the gradients first, as in ``skip_spikes(adamw)``; the float32 cast of a
  # bf16 leaf that a clip scales), and an operation with two consumers is
  # written to memory: a gradient-sized buffer, and one more pass over it.
  # The barrier itself copies nothing. tests/test_cost.py measures both
  # ways; the Performance guide's memory tables have the numbers.
  x = _real_f32(_compat.optimization_barrier(jnp.asarray(x)))
  return jnp.sum(x * x)


def _psum(x: Any, axis_name: AxisName) -> Any:
  if axis_name is None:
    return x
  return jax.lax.psum(x, axis_name)


def _rescale_factor(overflowed: jax.Array) -> jax.Array:
  """2**-88 where ``overflowed`` (always, in the rescaled pass), else 1.

  Computed at run time on purpose: with a compile-time constant ``c``, XLA
  may rewrite ``(x * c) * (x * c)`` into ``(x * x) * (c * c)`` (it does for
  scalar leaves), where ``c * c`` underflows to 0 and ``x * x`` overflows:
  NaN instead of the norm.
  """
  return jnp.where(overflowed, F32(2.0**-_RESCALE_LOG2), F32(1.0))


def _sum_and_max(a: tuple[jax.Array, jax.Array],
                 b: tuple[jax.Array, jax.Array]
                 ) -> tuple[jax.Array, jax.Array]:
  # One function for every leaf, so that jax traces the reducer once (it
  # caches the reducer's jaxpr by function), not once per leaf.
  return a[0] + b[0], jnp.maximum(a[1], b[1])


def _leaf_rescaled_sq_sum(x: jax.Array, factor: jax.Array) -> jax.Array:
  """The sum of the squares of ``x * factor``, for the rescaled pass.

  One read of ``x``: a two-operand reduction (the scaled squares' sum and
  the largest magnitude, which turns an Inf element into an Inf sum) takes
  its elementwise producers into its own loop, where XLA:CPU would give a
  plain sum of ``x * factor`` a materialised broadcast of ``factor`` as large
  as the leaf. It reduces the last axis first and then sums the partial
  sums, so that the float32 accumulation error is that of one row, without
  a reshape (which would make the SPMD partitioner gather a sharded leaf).
  """
  x = _real_f32(x)
  if not x.size:
    return jnp.zeros([], F32)
  scaled = x * factor
  sq, top = jax.lax.reduce(
      (scaled * scaled, jnp.abs(x)), (F32(0.0), F32(0.0)), _sum_and_max,
      (x.ndim - 1,) if x.ndim else ())
  return jnp.where(jnp.isinf(jnp.max(top)), jnp.inf, jnp.sum(sq))


def _rescaled_norm(sq_sum: jax.Array, factor: jax.Array) -> jax.Array:
  """The norm from the sum of squares of the elements times ``factor``.

  ``inf`` if that sum is (an Inf element); else at most ``F32_MAX``, which
  the norm exceeds only when elements come within a factor ``sqrt(size)``
  of float32's largest value.
  """
  norm = jnp.minimum(jnp.sqrt(sq_sum) / factor, F32_MAX)
  return jnp.where(jnp.isinf(sq_sum), jnp.inf, norm)


def global_norm(tree: Any, axis_name: AxisName = None) -> jax.Array:
  """Float32 L2 norm of all leaves of ``tree`` together.

  The norm of the per-leaf norms (`leaf_norms`, then `norm_of_norms`), as
  the reference ZClip and PyTorch's ``clip_grad_norm_`` compute it. With
  ``axis_name`` the per-leaf squared sums are summed over that mesh axis
  before the square roots, so each device may hold only a slice of the
  gradients. An empty tree has norm 0.

  Because every global norm in the package is built this way, XLA computes
  one set of per-leaf sums for all of them: `skip_spikes` around a `zclip`,
  `clip_by_global_norm` or `adagc` reads the gradients no more often than
  the transform alone.

  The norm is finite whenever every element is: a leaf whose float32 sum of
  squares overflows (a leaf norm above about 1.8e19) is measured again on
  its elements scaled down by 2**-88 (exact, and enough for up to 2**48
  elements of any finite size), under `jax.lax.cond`, only on such a step,
  so a normal step reads the gradients once; the sum of the leaf norms'
  squares is rescaled the same way when it overflows. A norm beyond
  float32's range (elements near 3.4e38) is reported as float32's largest
  value rather than ``inf``, so the step still counts as finite and is
  clipped. NaN or Inf elements give a NaN or Inf norm.

  Raises:
    ValueError: if a leaf is not floating point (`check_float_leaves`).
  """
  return norm_of_norms(leaf_norms(tree, axis_name))


def leaf_norms(tree: Any, axis_name: AxisName = None) -> jax.Array:
  """Float32 L2 norm of each leaf of ``tree``, as one vector.

  The norms of `leaf_norm_list`, stacked; with ``axis_name`` all the
  per-leaf squared sums travel in a single ``psum``. A leaf whose float32
  sum of squares overflows has its norm recomputed after rescaling, under
  `jax.lax.cond` (taken on every device alike), and is at most float32's
  largest value unless it holds an Inf; a NaN element gives a NaN norm.

  Raises:
    ValueError: if a leaf is not floating point (`check_float_leaves`).
  """
  return stack_norms(leaf_norm_list(tree, axis_name))


def stack_norms(norms: Sequence[jax.Array]) -> jax.Array:
  """The scalars of `leaf_norm_list` as one float32 vector (empty: [0])."""
  return jnp.stack(norms) if norms else jnp.zeros([0], F32)


def leaf_norm_list(tree: Any, axis_name: AxisName = None) -> list[jax.Array]:
  """`leaf_norms` as a list of float32 scalars, one per leaf.

  Each norm is a buffer of its own, so that what is computed from one
  leaf's norm (AdaGC's factor, folded into that leaf's update) compiles to
  the same kernel for every leaf of the same shape, which XLA compiles
  once. Slicing one vector of all the norms instead puts a different index
  into every leaf's kernel.
  """
  leaves = check_float_leaves(tree)
  if not leaves:
    return []
  sq = _psum([_leaf_sq_sum(x) for x in leaves], axis_name)
  overflowed = jnp.any(jnp.isinf(jnp.stack(sq)))

  def rescaled():
    factor = _rescale_factor(overflowed)
    sums = _psum([_leaf_rescaled_sq_sum(x, factor) for x in leaves],
                 axis_name)
    # Leaves that did not overflow keep the first pass's norm (NaN stays NaN).
    return [jnp.where(jnp.isinf(s), _rescaled_norm(r, factor), jnp.sqrt(s))
            for s, r in zip(sq, sums, strict=True)]

  return jax.lax.cond(overflowed, rescaled,
                      lambda: [jnp.sqrt(s) for s in sq])


def norm_of_norms(norms: jax.Array) -> jax.Array:
  """``sqrt(sum(norms ** 2))`` without overflow, for a vector of norms.

  Finite norms give a finite result (at most float32's largest value, as in
  `global_norm`); a NaN or Inf norm gives NaN or Inf. An empty vector gives 0.
  The vector holds one entry per leaf, so both sums cost nothing.
  """
  factor = _rescale_factor(jnp.isinf(jnp.sum(jnp.square(norms))))
  return _rescaled_norm(jnp.sum(jnp.square(norms * factor)), factor)


def clip_scale(norm: jax.Array, limit: jax.Array,
               eps: jax.typing.ArrayLike = 0.0) -> jax.Array:
  """The factor that brings a global ``norm`` down to ``limit``.

  ``limit / (norm + eps)`` when ``norm > limit``, else 1; also 1 for a NaN or
  Inf ``norm``, so that a non-finite update passes through untouched (for
  `optax.apply_if_finite` to see) instead of being zeroed.
  """
  clip = jnp.isfinite(norm) & (norm > limit)
  return jnp.where(clip, limit / jnp.where(clip, norm + eps, 1.0), 1.0)


def write_slot(buffer: jax.Array, index: jax.Array, value: jax.Array,
               flag: jax.Array) -> jax.Array:
  """``buffer`` with slot ``index`` set to ``value`` where ``flag`` holds.

  A select over the (small) ring buffer rather than ``buffer.at[index]``: XLA
  turns a scatter into a loop and then runs its algebraic simplifier over the
  whole step once more, a compile-time cost that grows with the number of
  parameter leaves although the buffer holds a few hundred floats.
  """
  hit = (jnp.arange(buffer.shape[0]) == index) & flag
  return jnp.where(hit, jnp.asarray(value, buffer.dtype), buffer)


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
