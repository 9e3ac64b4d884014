"""A fixed threshold, with the guarantees and telemetry of the rest."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_zclip import _numerics, _shared_norms, _validation
from optax_zclip._numerics import AxisName
from optax_zclip._registry import loggable_state


@loggable_state(
    "clip",
    fields=("count", "grad_norm", "clipped_norm", "threshold",
            "clipped_count", "nonfinite_count"))
class ClipByGlobalNormState(NamedTuple):
  """State of `clip_by_global_norm`: telemetry only (the rule has no memory).

  Every field is a scalar, and `optax_zclip.stats` reports all of them, as
  ``clip/<field>`` (:ref:`telemetry-names`).

  Attributes:
    count: int32, number of steps whose global norm was finite (steps with a
      NaN or Inf norm are counted in ``nonfinite_count`` instead).
    grad_norm: float32, global L2 norm of the last step's incoming updates,
      before clipping (NaN or Inf on a non-finite step).
    clipped_norm: float32, global norm of the last step's outgoing updates,
      ``min(grad_norm, max_norm)`` on a finite step.
    threshold: float32, ``max_norm`` (``inf`` when it is None).
    clipped_count: int32, cumulative number of steps that were scaled down.
    nonfinite_count: int32, cumulative number of steps whose global norm was
      NaN or Inf; their updates passed through untouched.

  References:
    Pascanu et al., `On the difficulty of training recurrent neural
    networks <https://arxiv.org/abs/1211.5063>`_, 2013.
  """

  count: jax.Array
  grad_norm: jax.Array
  clipped_norm: jax.Array
  threshold: jax.Array
  clipped_count: jax.Array
  nonfinite_count: jax.Array


def clip_by_global_norm(
    max_norm: jax.typing.ArrayLike | None,
    *,
    axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clips updates using their global norm, and logs what it did.

  A drop-in for `optax.clip_by_global_norm`: when the global L2 norm ``g`` of
  the updates exceeds ``max_norm``, they are multiplied by ``max_norm / g``;
  on float32 updates the result equals optax's within rounding. The norm is
  accumulated in float32 and stays finite for any finite gradient, a NaN or
  Inf step passes through untouched (for `optax.apply_if_finite`), and the
  state records the norms before and after for `optax_zclip.stats`; with
  ``max_norm=None`` the transform only measures. How it differs from
  optax's, and why: :ref:`fixed-threshold`.

  Args:
    max_norm: the largest global norm let through; > 0, or None (or inf)
      to measure and log without clipping.
    axis_name: a mesh axis name (or tuple of names) over which the squared
      norm is ``psum``-ed, inside `jax.shard_map` or `jax.pmap` when each
      device holds a slice of every gradient. Leave None on one device, for
      replicated gradients and under sharded `jax.jit`
      (:doc:`/guides/distributed`).

  Returns:
    An `optax.GradientTransformation` whose state is a
    `ClipByGlobalNormState`.

  Raises:
    ValueError: if ``max_norm`` is neither None nor a number > 0; the
      message names the argument.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_zclip
    >>> tx = optax_zclip.clip_by_global_norm(1.0)
    >>> state = tx.init(jnp.zeros(2))
    >>> out, state = tx.update(jnp.array([3.0, 4.0]), state)
    >>> print(out, float(state.grad_norm), int(state.clipped_count))
    [0.6 0.8] 5.0 1

  References:
    Pascanu et al., `On the difficulty of training recurrent neural networks
    <https://arxiv.org/abs/1211.5063>`_, 2013.
  """
  if max_norm is not None:
    _validation.check_number("max_norm", max_norm, lambda v: v > 0,
                             "None or > 0 (inf: no cap)", float32=True,
                             inf_ok=True)

  def init_fn(params):
    del params
    i32, scalar = jnp.int32, _numerics.scalar
    return ClipByGlobalNormState(
        count=scalar(0, i32), grad_norm=scalar(0.0), clipped_norm=scalar(0.0),
        threshold=scalar(jnp.inf if max_norm is None else max_norm),
        clipped_count=scalar(0, i32), nonfinite_count=scalar(0, i32))

  def update_fn(updates, state, params=None):
    del params
    _validation.check_state("clip_by_global_norm", state,
                            ClipByGlobalNormState)
    g_norm = _shared_norms.global_norm(updates, axis_name)
    finite = jnp.isfinite(g_norm)
    threshold = _numerics.as_f32(jnp.inf if max_norm is None else max_norm)
    # With max_norm=None the scale is always 1, but it is still applied, so
    # that measuring alone compiles to the same step as clipping: the norm's
    # squares stay apart from the optimizer's own squares of the same
    # gradients, which XLA would otherwise be free to merge and write to
    # memory. tests/test_hlo.py (test_scaling_fuses_into_adamw,
    # "measure_only") checks that it adds no pass over the gradients.
    scale = _numerics.clip_scale(g_norm, threshold)
    updates = _numerics.scale_tree(updates, scale)
    new_state = ClipByGlobalNormState(
        count=_numerics.increment_where(finite, state.count),
        grad_norm=g_norm,
        clipped_norm=g_norm * scale,
        threshold=threshold,
        clipped_count=_numerics.increment_where(scale < 1,
                                                state.clipped_count),
        nonfinite_count=_numerics.increment_where(~finite,
                                                  state.nonfinite_count))
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)
