"""ZClip: adaptive gradient clipping by z-score anomaly detection."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_zclip import _numerics, _validation
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
  """State of `zclip`: the norm statistics plus telemetry of the last step.

  Every field is a scalar. The field names are public API: `optax_zclip.stats`
  reports all of them but ``consecutive_spikes``, plus ``std = sqrt(var)``,
  as ``zclip/<field>``.

  Attributes:
    count: int32, number of steps whose global norm was finite, i.e. the
      number of norms the statistics have seen. Warm-up lasts while
      ``count < warmup_steps``. Non-finite steps are counted in
      ``nonfinite_count`` instead.
    mean: float32, the statistics' mean of the gradient norm. During warm-up
      the arithmetic mean of the norms so far; afterwards their exponential
      moving average (EMA).
    var: float32, the statistics' variance. During warm-up the population
      variance (divided by N) of the norms so far; afterwards the EMA
      variance.
    grad_norm: float32, global L2 norm of the last step's incoming updates,
      before clipping (NaN or Inf if that step was non-finite).
    clipped_norm: float32, global norm of the last step's outgoing updates,
      ``grad_norm * scale``.
    z_score: float32, ``(grad_norm - mean) / (std + eps)`` of the last step,
      measured against the statistics before that step; 0 during warm-up.
    threshold: float32, the global norm above which the last step counted as
      a spike or was capped by ``max_grad_norm``: ``min(mean + z_thresh *
      (std + eps), max_grad_norm)`` in mode ``"zscore"`` (``std`` without
      ``eps`` in mode ``"percentile"``); during warm-up ``max_grad_norm``
      (``inf`` when it is None).
    spike_count: int32, cumulative number of steps detected as spikes.
    nonfinite_count: int32, cumulative number of steps whose global norm was
      NaN or Inf; they leave ``count``, ``mean`` and ``var`` untouched.
    consecutive_spikes: int32, how many of the latest steps with a finite
      norm were spikes in a row (0 after a step that was not a spike; a
      non-finite step neither extends nor breaks the run).
    restart_count: int32, cumulative number of times the statistics
      restarted their warm-up after ``max_consecutive_spikes`` spikes in a
      row (always 0 when it is None).
    capped: int32, 1 if the last step was clipped by the cap
      ``max_grad_norm`` rather than by the z-score rule, else 0: its norm
      was finite and above the cap, and the cap was below the limit the
      rule set (the clip value on a spike, the norm itself otherwise). In
      warm-up only the cap clips. Always 0 when ``max_grad_norm`` is None.
    cap_count: int32, cumulative number of steps clipped by the cap (the
      steps with ``capped == 1``). The steps the z-score rule clipped are
      the spikes the cap did not override: on a run whose norms sit above
      ``max_grad_norm``, ``cap_count`` grows every step and ``spike_count``
      barely moves.

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


def _zscore(g, mean, std, eps):
  """``(g - mean) / (std + eps)``, with no NaN when ``std + eps == 0``."""
  diff = g - mean
  denom = std + eps
  ok = denom > 0
  z = diff / jnp.where(ok, denom, 1.0)
  # A zero spread makes any excess infinitely unlikely; equality is z = 0.
  degenerate = jnp.where(diff > 0, jnp.inf, jnp.where(diff < 0, -jnp.inf, 0.0))
  return jnp.where(ok, z, degenerate)


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
  r"""ZClip: clips the global gradient norm when it is a z-score outlier.

  One number is not adaptive: the cap ``max_grad_norm`` (1.0 by default, the
  authors' default) clips every step whose norm is above it, spike or not.
  On a run whose norms sit above the cap, the cap clips every step and the
  z-score rule none; `optax_zclip.stats` says which rule clipped a step
  (``zclip/capped``, ``zclip/cap_count``). There, pass
  ``max_grad_norm=None`` (or a value several times the usual norm) to let
  the adaptive rule decide.

  ZClip keeps an exponential moving average (EMA) of the global gradient norm
  ``g`` and of its variance. After a warm-up of ``warmup_steps`` steps, which
  seeds the statistics with the arithmetic mean and population variance of the
  first norms (and meanwhile clips only to ``max_grad_norm``), each step
  computes ``z = (g - mean) / (std + eps)``. A step with ``z > z_thresh`` is a
  spike and its norm is clipped to ``c``; with the default
  ``clip_option="adaptive_scaling"`` (the paper's reciprocal rule)

  .. math::
    c = \left(\mu + \frac{z_{thres}^2\, \sigma}{z}\right) \cdot
    \mathrm{clip\_factor},

  so the larger the outlier, the closer to the mean it is pulled. The limit is
  then capped at ``max_grad_norm`` (when not None) and the updates are
  multiplied by ``limit / (g + eps)`` if ``g`` exceeds it. The statistics are
  then updated with ``c`` on a spike (unless ``skip_update_on_spike``) and
  with ``g`` otherwise: ``mean = alpha * mean + (1 - alpha) * x`` and, with
  the new mean, ``var = alpha * var + (1 - alpha) * (x - mean) ** 2``.

  The clipping decisions are those of the authors' PyTorch ``ZClip``, step for
  step, with the same argument names and defaults. Beyond it:

  * The norm is accumulated in float32 whatever the updates' dtype, and the
    updates keep their dtype. A finite gradient has a finite norm however
    large (a float32 sum of squares that overflows is redone after
    rescaling, only on such a step), so a 1e20 gradient is clipped as a
    spike. Such a norm during warm-up saturates ``var`` at float32's
    largest value instead of making it Inf; it then decays by ``alpha``
    per step.
  * A NaN or Inf norm leaves ``count``, ``mean`` and ``var`` exactly as they
    were, increments ``nonfinite_count`` and passes the updates through
    unchanged, so that `optax.apply_if_finite` can skip the step.
  * Pure and jit-friendly: no host sync and no Python branch on traced
    values, so every numeric argument (``warmup_steps`` included) can be
    injected with `optax.inject_hyperparams`.

  Args:
    alpha: EMA smoothing factor of the mean and variance, in (0, 1) as a
      float32. Larger values remember longer.
    z_thresh: z-score above which a step is a spike (mode ``"zscore"``), or the
      number of standard deviations above the mean where clipping starts
      (mode ``"percentile"``). > 0.
    max_grad_norm: an absolute cap on the global norm, applied at every step
      (alone during warm-up), or None or inf for no cap. > 0. The default,
      1.0, is the authors': it clips every step whose norm is above 1.0,
      spike or not, so on a run whose usual norm is near or above 1 the
      cap does all the clipping and the z-score none (``zclip/capped`` is 1
      on each such step). Keep it where the usual norm is well below 1;
      else pass None or a value several times the usual norm.
    eps: added to ``std`` in the z-score and to ``g`` in the clip factor;
      finite and >= 0.
    warmup_steps: number of steps with a finite norm that seed the
      statistics; an integer in [1, 2**31 - 1] (the int32 counter saturates
      at 2**31 - 1).
    mode: ``"zscore"`` (spike when ``z > z_thresh``, clip by ``clip_option``)
      or ``"percentile"`` (spike when ``g > mean + z_thresh * std``, clip to
      that value).
    clip_option: in mode ``"zscore"``, the clip value on a spike:
      ``"adaptive_scaling"`` (the reciprocal rule above), ``"mean"`` (clip to
      the EMA mean) or ``"max"`` (the paper's variant, ``mean + z_thresh *
      std``). Ignored in mode ``"percentile"``.
    clip_factor: multiplies the whole ``"adaptive_scaling"`` threshold, mean
      included (0.5-0.9 clips more aggressively). > 0.
    skip_update_on_spike: if True, a spike leaves the statistics unchanged
      instead of feeding them the clip value.
    max_consecutive_spikes: None (the reference's behaviour), or an integer
      N in [1, 2**31 - 1]: after N spikes in a row the statistics restart
      their warm-up (``count``, ``mean`` and ``var`` as at init; the
      telemetry counters are kept and ``restart_count`` goes up), so that the
      next
      ``warmup_steps`` norms seed them afresh. Without it, a norm that jumps
      to a new level and stays there (or a ``clip_factor < 1``, which feeds
      the statistics less than the threshold) can leave every later step a
      spike, clipped to a stale mean for good.
    axis_name: a mesh axis name (or tuple of names) over which the squared
      norm is ``psum``-ed before the square root, for use inside
      `jax.shard_map` or `jax.pmap` when each device holds a slice of the
      gradients; every leaf must then be split over those axes (a
      replicated leaf would be counted once per device). Leave None on one
      device, for replicated gradients (data parallelism after a ``pmean``),
      and under sharded `jax.jit`, where the norm is already global.

  Returns:
    An `optax.GradientTransformation` whose state is a `ZClipState`.

  Raises:
    ValueError: if a hyperparameter given as a Python or NumPy number, a
      string or a concrete (non-traced) jax array is out of its range (float
      arguments are checked as float32 values); the message names the
      argument. When ``update`` is traced, if a leaf of the updates is not
      floating point.

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
    <https://arxiv.org/abs/2504.02507>`_, 2025. Reference code:
    https://github.com/bluorion-com/ZClip
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
    a = _numerics.as_f32(alpha)
    zt = _numerics.as_f32(z_thresh)
    e = _numerics.as_f32(eps)
    mean, var = state.mean, state.var
    std = jnp.sqrt(var)

    g = _numerics.global_norm(updates, axis_name)
    finite = jnp.isfinite(g)
    warm = state.count < warmup_steps
    z = _zscore(g, mean, std, e)

    if mode == "zscore":
      bound = mean + zt * (std + e)
      is_spike = z > zt
      if clip_option == "adaptive_scaling":
        # Only read on a spike, where z > z_thresh > 0; the placeholder keeps
        # the unused branch free of 0/0.
        safe_z = jnp.where(is_spike, z, 1.0)
        c = (mean + zt * zt * std / safe_z) * _numerics.as_f32(clip_factor)
      elif clip_option == "mean":
        c = mean
      else:
        c = mean + zt * std
    else:
      bound = mean + zt * std
      is_spike = g > bound
      c = bound
    is_spike = is_spike & finite & ~warm
    # Statistics fed with norms up to float32's max (see below) would make
    # `c` overflow with clip_factor > 1.
    c = jnp.minimum(c, _numerics.F32_MAX)

    # The limit the z-score rule sets, then the cap over it. The cap decided
    # a step when it is below the rule's limit and the norm is above it.
    rule_limit = jnp.where(is_spike, c, g)
    limit = rule_limit
    threshold = jnp.where(warm, jnp.inf, bound)
    by_cap = jnp.zeros([], bool)
    if max_grad_norm is not None:
      cap = _numerics.as_f32(max_grad_norm)
      limit = jnp.minimum(rule_limit, cap)
      threshold = jnp.minimum(threshold, cap)
      by_cap = finite & (g > cap) & (cap < rule_limit)
    scale = _numerics.clip_scale(g, limit, e)
    updates = _numerics.scale_tree(updates, scale)

    # Statistics. Warm-up: running (Welford) mean and population variance of
    # the raw norms, so that after `warmup_steps` norms they equal the
    # reference's buffer mean/variance. Afterwards: EMA of x, the clip value
    # on a spike (not capped by max_grad_norm, as in the reference), else g.
    n = (state.count + 1).astype(F32)
    delta = g - mean
    w_mean = mean + delta / n
    w_var = var + (delta * (g - w_mean) - var) / n
    # The EMA in increment form, `v + (1 - a) * (x - v)`, equal to `a * v +
    # (1 - a) * x`: it cannot overflow for statistics near float32's max,
    # where XLA may fold the latter into `(v + x) * 0.5` for alpha = 0.5.
    x = jnp.where(is_spike, c, g)
    e_mean = mean + (1 - a) * (x - mean)
    e_var = var + (1 - a) * (jnp.square(x - e_mean) - var)
    keep = ~finite | (is_spike & skip_update_on_spike)
    # A finite norm may be as large as float32's max (global_norm), and its
    # square overflows. The statistics saturate there instead of becoming
    # inf: an inf var would turn the next warm-up update into inf - inf =
    # NaN, and would never decay afterwards.
    top = _numerics.F32_MAX
    new_mean = jnp.where(keep, mean,
                         jnp.minimum(jnp.where(warm, w_mean, e_mean), top))
    new_var = jnp.where(keep, var,
                        jnp.minimum(jnp.where(warm, w_var, e_var), top))

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
        grad_norm=g,
        clipped_norm=g * scale,
        z_score=jnp.where(warm, 0.0, z).astype(F32),
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
