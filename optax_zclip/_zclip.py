"""ZClip: adaptive gradient clipping by z-score anomaly detection."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_zclip import _numerics, _shared_norms, _validation
from optax_zclip._numerics import F32, AxisName
from optax_zclip._registry import loggable_state

MODES = ("zscore", "percentile")
CLIP_OPTIONS = ("adaptive_scaling", "mean", "max")


@loggable_state(
    "zclip",
    fields=("count", "mean", "var", "grad_norm", "clipped_norm", "z_score",
            "threshold", "spike_count", "nonfinite_count", "restart_count",
            "capped", "cap_count"),
    derived={"std": lambda s: jnp.sqrt(s["var"])})
class ZClipState(NamedTuple):
  """State of `zclip`: the norm statistics, and what the last step did.

  Every field is a scalar. `optax_zclip.stats` reports every field but
  ``consecutive_spikes``, plus ``std = sqrt(var)``, as ``zclip/<field>``
  (:ref:`telemetry-names`).

  Attributes:
    count: int32, number of steps whose global norm was finite, i.e. the
      number of norms the statistics have seen; warm-up lasts while
      ``count < warmup_steps``.
    mean: float32, the statistics' mean of the gradient norm: the
      arithmetic mean of the norms during warm-up, then their exponential
      moving average (EMA).
    var: float32, the statistics' variance: the population variance of the
      norms during warm-up, then the EMA variance.
    grad_norm: float32, global L2 norm of the last step's incoming updates,
      before clipping (NaN or Inf if that step was non-finite).
    clipped_norm: float32, global norm of the last step's outgoing updates,
      ``grad_norm * scale``.
    z_score: float32, ``(grad_norm - mean) / (std + eps)`` of the last step,
      against the statistics before it; 0 during warm-up.
    threshold: float32, the global norm above which the last step counted as
      a spike or was capped: ``min(mean + z_thresh * (std + eps),
      max_grad_norm)`` (``std`` without ``eps`` in mode ``"percentile"``);
      ``max_grad_norm`` during warm-up (``inf`` when it is None).
    spike_count: int32, cumulative number of steps detected as spikes.
    nonfinite_count: int32, cumulative number of steps whose global norm was
      NaN or Inf; they leave ``count``, ``mean`` and ``var`` untouched.
    consecutive_spikes: int32, how many of the latest steps with a finite
      norm were spikes in a row (not reported by `optax_zclip.stats`).
    restart_count: int32, cumulative number of times the statistics
      restarted their warm-up after ``max_consecutive_spikes`` spikes in a
      row (always 0 when it is None).
    capped: int32, 1 if the cap ``max_grad_norm`` rather than the z-score
      rule clipped the last step, else 0 (:ref:`zclip-cap`).
    cap_count: int32, cumulative number of steps the cap clipped (the steps
      with ``capped == 1``).

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025.
  """

  count: jax.Array
  mean: jax.Array
  var: jax.Array
  grad_norm: jax.Array
  clipped_norm: jax.Array
  z_score: jax.Array
  threshold: jax.Array
  spike_count: jax.Array
  nonfinite_count: jax.Array
  consecutive_spikes: jax.Array
  restart_count: jax.Array
  capped: jax.Array
  cap_count: jax.Array


def _validate(alpha, z_thresh, max_grad_norm, eps, warmup_steps, clip_factor):
  check = _validation.check_number
  check("alpha", alpha, lambda v: 0 < v < 1, "in the open interval (0, 1)",
        float32=True)
  check("z_thresh", z_thresh, lambda v: v > 0, "finite and > 0",
        float32=True)
  if max_grad_norm is not None:
    check("max_grad_norm", max_grad_norm, lambda v: v > 0,
          "None or > 0 (inf: no cap)", float32=True, inf_ok=True)
  check("eps", eps, lambda v: v >= 0, "finite and >= 0", float32=True)
  _validation.check_int("warmup_steps", warmup_steps, 1,
                        _validation.INT32_MAX)
  check("clip_factor", clip_factor, lambda v: v > 0, "finite and > 0",
        float32=True)


def _zscore(norm, mean, std, eps):
  """``(norm - mean) / (std + eps)``, with no NaN when ``std + eps == 0``."""
  diff = norm - mean
  denom = std + eps
  ok = denom > 0
  z_score = diff / jnp.where(ok, denom, 1.0)
  # A zero spread makes any excess infinitely unlikely; equality is z = 0.
  degenerate = jnp.where(diff > 0, jnp.inf, jnp.where(diff < 0, -jnp.inf, 0.0))
  return jnp.where(ok, z_score, degenerate)


@_validation.keyword_only
def zclip(
    *,
    alpha: jax.typing.ArrayLike = 0.97,
    z_thresh: jax.typing.ArrayLike = 2.5,
    max_grad_norm: jax.typing.ArrayLike | None = 1.0,
    eps: jax.typing.ArrayLike = 1e-6,
    warmup_steps: jax.typing.ArrayLike = 25,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: jax.typing.ArrayLike = 1.0,
    skip_update_on_spike: bool = False,
    max_consecutive_spikes: int | None = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformation:
  r"""Clips the global gradient norm when it is a z-score outlier (ZClip).

  Keeps an exponential moving average (EMA) of the global gradient norm and
  of its variance, and clips the steps whose norm is an outlier against
  them, with the same decisions, argument names and defaults as the
  authors' PyTorch ``ZClip``. The first ``warmup_steps`` finite norms seed
  the statistics; meanwhile only the cap ``max_grad_norm`` clips.

  After warm-up, a step whose norm ``g`` has ``z = (g - mean) / (std + eps)
  > z_thresh`` is a spike, clipped (with the default ``clip_option``) to

  .. math::
    c = \left(\mu + \frac{z_{thres}^2\, \sigma}{z}\right) \cdot
    \mathrm{clip\_factor},

  and every step is clipped to ``max_grad_norm``. The statistics then take
  in ``c`` on a spike and ``g`` otherwise. A NaN or Inf norm passes the
  updates through and leaves the statistics alone. The cap is not adaptive:
  where the usual norm is near or above it, the cap does all the clipping
  (:ref:`zclip-cap`). The whole rule is in :ref:`the ZClip guide
  <zclip-rule>`.

  Args:
    alpha: EMA smoothing factor of the mean and variance, in (0, 1). Larger
      values remember longer.
    z_thresh: z-score above which a step is a spike (mode ``"zscore"``), or
      the number of standard deviations above the mean where clipping starts
      (mode ``"percentile"``); > 0.
    max_grad_norm: an absolute cap on the global norm, applied at every
      step, or None (or inf) for no cap; > 0. Where the usual norm is not
      well below it, pass None or a value several times the usual norm.
    eps: added to ``std`` in the z-score and to ``g`` in the clip factor;
      finite and >= 0.
    warmup_steps: number of finite norms that seed the statistics; an
      integer in [1, 2**31 - 1].
    mode: ``"zscore"`` (spike when ``z > z_thresh``, clipped by
      ``clip_option``) or ``"percentile"`` (spike when ``g > mean + z_thresh
      * std``, clipped to that value).
    clip_option: in mode ``"zscore"``, the clip value on a spike:
      ``"adaptive_scaling"`` (the rule above), ``"mean"`` (the EMA mean) or
      ``"max"`` (``mean + z_thresh * std``). Ignored in mode
      ``"percentile"``.
    clip_factor: multiplies the whole ``"adaptive_scaling"`` clip value,
      mean included (below 1 clips harder); > 0.
    skip_update_on_spike: if True, a spike leaves the statistics unchanged
      instead of feeding them the clip value.
    max_consecutive_spikes: None (the reference's behaviour), or an integer
      N in [1, 2**31 - 1]: after N spikes in a row the statistics restart
      their warm-up, for a norm that moved to a new level and stays there
      (:ref:`zclip-level-shift`).
    axis_name: a mesh axis name (or tuple of names) over which the squared
      norm is ``psum``-ed, inside `jax.shard_map` or `jax.pmap` when each
      device holds a slice of every gradient. Leave None on one device, for
      replicated gradients and under sharded `jax.jit`
      (:doc:`/guides/distributed`).

  Returns:
    An `optax.GradientTransformation` whose state is a `ZClipState`.

  Raises:
    ValueError: if a hyperparameter given as a number, a string or a
      concrete (non-traced) array is out of its range; the message names
      the argument. When ``update`` is traced, if a leaf of the updates is
      not floating point.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax, optax_zclip
    >>> tx = optax.chain(optax_zclip.zclip(warmup_steps=2), optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> for g in [0.3, 0.5, 0.4, 50.0]:
    ...   updates, state = tx.update({"w": jnp.array([g, 0.0])}, state)
    >>> s = optax_zclip.stats(state)
    >>> print(f"{s['zclip/grad_norm']:.1f} -> {s['zclip/clipped_norm']:.3f}")
    50.0 -> 0.401
    >>> print(int(s["zclip/spike_count"]))
    1

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025; the authors' code,
    `bluorion-com/ZClip <https://github.com/bluorion-com/ZClip>`_.
  """
  mode = _validation.check_choice("mode", mode, MODES)
  clip_option = _validation.check_choice("clip_option", clip_option,
                                         CLIP_OPTIONS)
  _validate(alpha, z_thresh, max_grad_norm, eps, warmup_steps, clip_factor)
  _validation.check_bool("skip_update_on_spike", skip_update_on_spike)
  if max_consecutive_spikes is not None:
    _validation.check_int("max_consecutive_spikes", max_consecutive_spikes, 1,
                          _validation.INT32_MAX)

  def init_fn(params):
    del params
    i32, scalar = jnp.int32, _numerics.scalar
    return ZClipState(
        count=scalar(0, i32), mean=scalar(0.0), var=scalar(0.0),
        grad_norm=scalar(0.0), clipped_norm=scalar(0.0), z_score=scalar(0.0),
        threshold=scalar(jnp.inf if max_grad_norm is None else max_grad_norm),
        spike_count=scalar(0, i32), nonfinite_count=scalar(0, i32),
        consecutive_spikes=scalar(0, i32), restart_count=scalar(0, i32),
        capped=scalar(0, i32), cap_count=scalar(0, i32))

  def update_fn(updates, state, params=None):
    del params
    _validation.check_state("zclip", state, ZClipState)
    alpha_f32 = _numerics.as_f32(alpha)
    z_thresh_f32 = _numerics.as_f32(z_thresh)
    eps_f32 = _numerics.as_f32(eps)
    mean, var = state.mean, state.var
    std = jnp.sqrt(var)

    grad_norm = _shared_norms.global_norm(updates, axis_name)
    finite = jnp.isfinite(grad_norm)
    warm = state.count < warmup_steps
    z_score = _zscore(grad_norm, mean, std, eps_f32)

    if mode == "zscore":
      bound = mean + z_thresh_f32 * (std + eps_f32)
      is_spike = z_score > z_thresh_f32
      if clip_option == "adaptive_scaling":
        # Only read on a spike, where z > z_thresh > 0; the placeholder keeps
        # the unused branch free of 0/0.
        safe_z = jnp.where(is_spike, z_score, 1.0)
        clip_value = ((mean + z_thresh_f32 * z_thresh_f32 * std / safe_z)
                      * _numerics.as_f32(clip_factor))
      elif clip_option == "mean":
        clip_value = mean
      else:
        clip_value = mean + z_thresh_f32 * std
    else:
      bound = mean + z_thresh_f32 * std
      is_spike = grad_norm > bound
      clip_value = bound
    is_spike = is_spike & finite & ~warm
    # Statistics fed with norms up to float32's max (see below) would make
    # `clip_value` overflow with clip_factor > 1.
    clip_value = jnp.minimum(clip_value, _numerics.F32_MAX)

    # The limit the z-score rule sets, then the cap over it. The cap decided
    # a step when it is below the rule's limit and the norm is above it.
    rule_limit = jnp.where(is_spike, clip_value, grad_norm)
    limit = rule_limit
    threshold = jnp.where(warm, jnp.inf, bound)
    by_cap = jnp.zeros([], bool)
    if max_grad_norm is not None:
      cap = _numerics.as_f32(max_grad_norm)
      limit = jnp.minimum(rule_limit, cap)
      threshold = jnp.minimum(threshold, cap)
      by_cap = finite & (grad_norm > cap) & (cap < rule_limit)
    scale = _numerics.clip_scale(grad_norm, limit, eps_f32)
    updates = _numerics.scale_tree(updates, scale)

    # Statistics. Warm-up: running (Welford) mean and population variance of
    # the raw norms, so that after `warmup_steps` norms they equal the
    # reference's buffer mean/variance. Afterwards: EMA of `fed_norm`, the
    # clip value on a spike (not capped by max_grad_norm, as in the
    # reference), else the norm.
    seen = (state.count + 1).astype(F32)
    delta = grad_norm - mean
    warmup_mean = mean + delta / seen
    warmup_var = var + (delta * (grad_norm - warmup_mean) - var) / seen
    # The EMA in increment form, `v + (1 - alpha) * (x - v)`, equal to
    # `alpha * v + (1 - alpha) * x`: it cannot overflow for statistics near
    # float32's max, where XLA may fold the latter into `(v + x) * 0.5` for
    # alpha = 0.5.
    fed_norm = jnp.where(is_spike, clip_value, grad_norm)
    ema_mean = mean + (1 - alpha_f32) * (fed_norm - mean)
    ema_var = var + (1 - alpha_f32) * (jnp.square(fed_norm - ema_mean) - var)
    keep = ~finite | (is_spike & skip_update_on_spike)
    # A finite norm may be as large as float32's max (global_norm), and its
    # square overflows. The statistics saturate there instead of becoming
    # inf: an inf var would turn the next warm-up update into inf - inf =
    # NaN, and would never decay afterwards.
    top = _numerics.F32_MAX
    new_mean = jnp.where(keep, mean,
                         jnp.minimum(jnp.where(warm, warmup_mean, ema_mean),
                                     top))
    new_var = jnp.where(keep, var,
                        jnp.minimum(jnp.where(warm, warmup_var, ema_var), top))

    count = _numerics.increment_where(finite, state.count)
    in_a_row = jnp.where(
        finite, jnp.where(is_spike, optax.safe_increment(
            state.consecutive_spikes), 0), state.consecutive_spikes)
    restart = jnp.zeros([], bool)
    if max_consecutive_spikes is not None:
      # A level shift the statistics cannot follow: start them over.
      restart = in_a_row >= max_consecutive_spikes
      count = jnp.where(restart, 0, count)
      new_mean = jnp.where(restart, 0.0, new_mean)
      new_var = jnp.where(restart, 0.0, new_var)
      in_a_row = jnp.where(restart, 0, in_a_row)

    new_state = ZClipState(
        count=count,
        mean=new_mean,
        var=new_var,
        grad_norm=grad_norm,
        clipped_norm=grad_norm * scale,
        z_score=jnp.where(warm, 0.0, z_score).astype(F32),
        threshold=threshold.astype(F32),
        spike_count=_numerics.increment_where(is_spike, state.spike_count),
        nonfinite_count=_numerics.increment_where(~finite,
                                                state.nonfinite_count),
        consecutive_spikes=in_a_row.astype(jnp.int32),
        restart_count=_numerics.increment_where(restart, state.restart_count),
        capped=by_cap.astype(jnp.int32),
        cap_count=_numerics.increment_where(by_cap, state.cap_count),
    )
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)
