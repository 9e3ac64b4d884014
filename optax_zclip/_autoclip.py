"""AutoClip: clip the global norm to a percentile of its recent history."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_zclip import _numerics, _shared_norms, _validation
from optax_zclip._numerics import F32, AxisName
from optax_zclip._registry import loggable_state


@loggable_state(
    "autoclip",
    fields=("count", "grad_norm", "clipped_norm", "threshold",
            "nonfinite_count"))
class AutoClipState(NamedTuple):
  """State of `autoclip`: a ring buffer of recent norms, plus telemetry.

  `optax_zclip.stats` reports every field but ``history``, as
  ``autoclip/<field>`` (:ref:`telemetry-names`).

  Attributes:
    count: int32 scalar, number of finite norms recorded so far (the
      buffer holds the last ``min(count, window)`` of them).
    history: float32 vector of shape ``[window]``, a ring buffer of the
      finite global norms; entry ``t % window`` holds the t-th one.
    grad_norm: float32 scalar, global norm of the last step's incoming
      updates, before clipping (NaN or Inf on a non-finite step).
    clipped_norm: float32 scalar, global norm of the last step's outgoing
      updates.
    threshold: float32 scalar, the percentile the last step was clipped to
      (``inf`` before any finite norm).
    nonfinite_count: int32 scalar, cumulative number of steps whose norm was
      NaN or Inf; they are not recorded and pass through unclipped.

  References:
    Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020.
  """

  count: jax.Array
  history: jax.Array
  grad_norm: jax.Array
  clipped_norm: jax.Array
  threshold: jax.Array
  nonfinite_count: jax.Array


def _percentile(history, n, q):
  """``np.percentile(history[:n], q)`` (linear) for a traced ``n >= 1``.

  The unused tail of the buffer is set to ``inf`` so that sorting puts it
  last; the interpolation only reads the first ``n`` sorted values.
  """
  valid = jnp.arange(history.shape[0]) < n
  s = jnp.sort(jnp.where(valid, history, jnp.inf))
  pos = q / 100.0 * (n - 1).astype(F32)
  lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, n - 1)
  hi = jnp.minimum(lo + 1, n - 1)
  frac = pos - lo.astype(F32)
  return s[lo] + frac * (s[hi] - s[lo])


@_validation.keyword_only
def autoclip(
    *,
    percentile: jax.typing.ArrayLike = 10.0,
    window: int = 1024,
    axis_name: AxisName = None,
) -> optax.GradientTransformation:
  """Clips the global norm to a percentile of the norms seen so far (AutoClip).

  Each step records the global norm ``g`` in a history, then multiplies the
  updates by ``threshold / g`` when ``g`` exceeds ``threshold``, the
  ``percentile``-th percentile of the history, the current norm included
  (NumPy's linear interpolation). The paper keeps every norm; here the
  history is a ring buffer of the last ``window``, so that the state has a
  static shape. A NaN or Inf norm is not recorded and passes the updates
  through untouched. More in :ref:`autoclip-rule`.

  Args:
    percentile: the percentile of the history to clip to, in [0, 100].
    window: how many of the most recent norms to keep; a Python int >= 1
      (it sets the state's shape, so under `optax.inject_hyperparams` list
      it in ``static_args``).
    axis_name: a mesh axis name (or tuple of names) over which the squared
      norm is ``psum``-ed, inside `jax.shard_map` or `jax.pmap` when each
      device holds a slice of every gradient. Leave None on one device, for
      replicated gradients and under sharded `jax.jit`
      (:doc:`/guides/distributed`).

  Returns:
    An `optax.GradientTransformation` whose state is an `AutoClipState`.

  Raises:
    ValueError: if ``percentile`` is outside [0, 100] or ``window`` is not
      an integer >= 1; the message names the argument. When ``update`` is
      traced, if a leaf of the updates is not floating point.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_zclip
    >>> tx = optax_zclip.autoclip(percentile=50.0, window=4)
    >>> state = tx.init(jnp.zeros(1))
    >>> for g in [1.0, 3.0, 2.0, 8.0]:
    ...   out, state = tx.update(jnp.array([g]), state)
    >>> print(float(out[0]), float(state.threshold))  # median of 1, 3, 2, 8
    2.5 2.5

  References:
    Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020.
  """
  _validation.check_number("percentile", percentile, lambda v: 0 <= v <= 100,
                           "in [0, 100]", float32=True)
  _validation.check_int("window", window, 1, static=True)
  window = int(window)

  def init_fn(params):
    del params
    i32, scalar = jnp.int32, _numerics.scalar
    return AutoClipState(
        count=scalar(0, i32), history=jnp.zeros([window], F32),
        grad_norm=scalar(0.0), clipped_norm=scalar(0.0),
        threshold=scalar(jnp.inf), nonfinite_count=scalar(0, i32))

  def update_fn(updates, state, params=None):
    del params
    _validation.check_state("autoclip", state, AutoClipState)
    g = _shared_norms.global_norm(updates, axis_name)
    finite = jnp.isfinite(g)
    history = _numerics.write_slot(state.history, state.count % window, g,
                                   finite)
    count = _numerics.increment_where(finite, state.count)
    n = jnp.minimum(count, window)
    threshold = jnp.where(
        n > 0, _percentile(history, jnp.maximum(n, 1),
                           _numerics.as_f32(percentile)), jnp.inf)
    scale = _numerics.clip_scale(g, threshold)
    new_state = AutoClipState(
        count=count, history=history, grad_norm=g, clipped_norm=g * scale,
        threshold=threshold,
        nonfinite_count=_numerics.increment_where(~finite,
                                                state.nonfinite_count))
    return _numerics.scale_tree(updates, scale), new_state

  return optax.GradientTransformation(init_fn, update_fn)
