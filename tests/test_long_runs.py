"""Long runs: 20,000 steps under `jax.lax.scan`, and saturating counters.

A float32 statistic that drifts a little each step could be far off after
tens of thousands of steps; an int32 counter that wraps would put a run back
into warm-up. Each long run feeds ZClip a one-element gradient whose value
(the global norm) comes from a formula of the step counter, with a slow
decay, two periodic wiggles and two trains of periodic spikes, and compares
every step with the float64 reference fed the same norms; every clipping
transform of the registry (transforms.py) runs as long, on a two-leaf
gradient, against its own float64 reference, and has its counters driven to
int32's end.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import AdaGCRef, AutoClipRef, ZClipRef
from transforms import CLIPPERS, TRANSFORMS

import optax_zclip

N = 20_000
IMAX = int(np.iinfo(np.int32).max)


def _norm_at(t):
  """The gradient norm of step ``t`` (an int32 array), in float32."""
  tf = t.astype(jnp.float32)
  base = (1.0 + 0.5 * jnp.exp(-tf / 4000.0)) * (
      1.0 + 0.15 * jnp.sin(tf / 53.0) + 0.05 * jnp.sin(tf / 7.3))
  spike = jnp.where(t % 997 == 500, 8.0, jnp.where(t % 1499 == 700, 3.0, 1.0))
  return base * spike


def _norm64(t):
  """`_norm_at` in float64, for a sanity check of the recorded norms."""
  base = (1.0 + 0.5 * np.exp(-t / 4000.0)) * (
      1.0 + 0.15 * np.sin(t / 53.0) + 0.05 * np.sin(t / 7.3))
  return base * np.where(t % 997 == 500, 8.0,
                         np.where(t % 1499 == 700, 3.0, 1.0))


def _scan_run(cfg):
  tx = optax_zclip.zclip(**cfg)

  def body(state, t):
    out, state = tx.update(jnp.stack([_norm_at(t)]), state)
    return state, (state.grad_norm, out[0], state.mean, state.var,
                   state.spike_count)

  run = jax.jit(lambda: jax.lax.scan(body, tx.init(None), jnp.arange(N)))
  state, ys = run()
  return state, [np.asarray(y) for y in ys]


def _reference_run(cfg, norms):
  """ZClipRef over ``norms``: per-step scale, mean, var and spike flag."""
  ref = ZClipRef(**cfg)
  scale, mean, var, spike = (np.empty(len(norms)) for _ in range(4))
  s1 = s2 = 0.0  # the warm-up buffer's sums, without re-summing it
  for t, g in enumerate(norms):
    r = ref.step(float(g))
    if ref.initialized:
      mean[t], var[t] = ref.mean, ref.var
    else:
      s1, s2 = s1 + g, s2 + g * g
      mean[t] = s1 / (t + 1)
      var[t] = max(s2 / (t + 1) - mean[t] ** 2, 0.0)
    if not r["warmup"]:
      # Well posed: no decision within float32 error of its threshold.
      assert abs(r["z"] - ref.z_thresh) > 1e-3, t
    scale[t], spike[t] = r["scale"], r["spike"]
  return ref, scale, mean, var, spike


CONFIGS = {
    "zscore": dict(max_grad_norm=None),
    "zscore_capped": dict(max_grad_norm=1.2, alpha=0.99, z_thresh=2.0),
    "percentile": dict(max_grad_norm=None, mode="percentile"),
    # Welford's running mean and variance over a long warm-up, in float32.
    "long_warmup": dict(max_grad_norm=None, warmup_steps=10_000),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_twenty_thousand_steps_track_the_float64_reference(name):
  cfg = CONFIGS[name]
  state, (g, out, mean, var, spikes) = _scan_run(cfg)
  t = np.arange(N)
  np.testing.assert_allclose(g, _norm64(t), rtol=1e-3)  # the norms fed
  ref, r_scale, r_mean, r_var, r_spike = _reference_run(cfg, g)
  # Every step: the scale applied, and the statistics within 0.1% (float32
  # against float64; the drift measured is about 1e-5). The atol covers the
  # first warm-up steps, where var is ~1e-5 * mean**2 and float32's
  # cancellation error in it is ~1e-7 * mean**2.
  np.testing.assert_allclose(out / g, r_scale, rtol=1e-5)
  np.testing.assert_allclose(mean, r_mean, rtol=1e-3)
  np.testing.assert_allclose(var, r_var, rtol=1e-3, atol=1e-6)
  for k in (4999, 9999, 14999, N - 1):  # the checkpoints, spelled out
    assert abs(mean[k] / r_mean[k] - 1) < 1e-3, k
    assert abs(var[k] / r_var[k] - 1) < 1e-3, k
  # The same spikes, at the same steps, and every counter right.
  spike_steps = np.flatnonzero(np.diff(spikes, prepend=0))
  np.testing.assert_array_equal(spike_steps, np.flatnonzero(r_spike))
  assert int(state.spike_count) == ref.spikes >= 10
  assert int(state.count) == N and int(state.nonfinite_count) == 0
  # Spikes late in the run are still caught (the statistics did not drift).
  assert spike_steps.max() > N - 1500


# --------------------------------------------------------------------------
# int32 counters saturate (optax.safe_increment) instead of wrapping.


def _near_max(state, *fields):
  return state._replace(**{f: jnp.asarray(IMAX - 1, jnp.int32)
                           for f in fields})


# Spikes, NaN and Inf, ordinary steps: every counter gets more than 1 tick.
FEED = [50.0, math.nan, 60.0, 1.0, math.inf, 1.1, 70.0, math.nan, 0.9]


def test_zclip_counters_saturate_and_decisions_carry_on():
  cfg = dict(warmup_steps=3, max_grad_norm=None)
  tx = optax_zclip.zclip(**cfg)
  update = jax.jit(tx.update)
  state = tx.init(None)
  ref = ZClipRef(**cfg)
  for g in [1.0, 1.2, 0.9, 1.1, 1.0]:
    _, state = update(jnp.array([g]), state)
    ref.step(g)
  state = _near_max(state, "count", "spike_count", "nonfinite_count")
  # The reference carries on from the state's float32 statistics.
  ref.mean, ref.var = float(state.mean), float(state.var)
  for g in FEED:
    out, state = update(jnp.array([g], jnp.float32), state)
    r = ref.step(g)
    for f in ("count", "spike_count", "nonfinite_count"):
      assert IMAX - 1 <= int(getattr(state, f)) <= IMAX, f
    if math.isfinite(g):  # not sent back into warm-up by a wrapped count
      assert not r["warmup"]
      np.testing.assert_allclose(float(out[0]), g * r["scale"], rtol=1e-5)
      np.testing.assert_allclose(float(state.mean), ref.mean, rtol=1e-5)
      np.testing.assert_allclose(float(state.var), ref.var, rtol=1e-4)
  assert int(state.count) == IMAX
  assert int(state.spike_count) == IMAX and ref.spikes == 3
  assert int(state.nonfinite_count) == IMAX and ref.nonfinite == 3


def test_adagc_counters_saturate_and_gamma_carries_on():
  tx = optax_zclip.adagc(warmup_steps=2, max_grad_norm=None)
  update = jax.jit(tx.update)
  tree = {"a": jnp.ones(2), "b": jnp.ones(3)}
  state = tx.init(tree)
  ref = AdaGCRef(warmup_steps=2, max_grad_norm=None)
  for g in [1.0, 1.2, 0.9]:
    grads = {"a": jnp.full(2, g), "b": jnp.full(3, 2 * g)}
    _, state = update(grads, state)
    ref.step([np.asarray(grads["a"]), np.asarray(grads["b"])])
  state = _near_max(state, "count", "nonfinite_count")
  ref.gamma = [float(state.gamma["a"]), float(state.gamma["b"])]
  scales_a = []
  for g in FEED:
    grads = {"a": jnp.full(2, g, jnp.float32),
             "b": jnp.full(3, 1.0, jnp.float32)}
    out, state = update(grads, state)
    scales = ref.step([np.asarray(grads["a"]), np.asarray(grads["b"])])
    assert IMAX - 1 <= int(state.count) <= IMAX
    assert IMAX - 1 <= int(state.nonfinite_count) <= IMAX
    scales_a.append(scales[0])
    if math.isfinite(g):
      np.testing.assert_allclose(np.asarray(out["a"]), g * scales[0],
                                 rtol=1e-5)
    # "b" too: a NaN or Inf step in "a" is no observation for "b" either.
    for i, k in enumerate("ab"):
      np.testing.assert_allclose(float(state.gamma[k]), ref.gamma[i],
                                 rtol=1e-5)
  assert int(state.count) == IMAX and int(state.nonfinite_count) == IMAX
  assert min(scales_a) < 0.1  # the spikes in "a" were clipped


def test_autoclip_counters_saturate_and_threshold_stays_a_percentile():
  tx = optax_zclip.autoclip(percentile=50.0, window=4)
  update = jax.jit(tx.update)
  state = tx.init(None)
  for g in [1.0, 2.0, 3.0, 4.0, 5.0]:
    _, state = update(jnp.array([g]), state)
  state = _near_max(state, "count", "nonfinite_count")
  for g in FEED:
    out, state = update(jnp.array([g], jnp.float32), state)
    assert IMAX - 1 <= int(state.count) <= IMAX
    assert IMAX - 1 <= int(state.nonfinite_count) <= IMAX
    hist = np.asarray(state.history, np.float64)
    thr = float(np.percentile(hist, 50.0))  # the whole window is valid
    np.testing.assert_allclose(float(state.threshold), thr, rtol=1e-6)
    if math.isfinite(g):
      assert np.float32(g) in hist.astype(np.float32)  # it was recorded
      np.testing.assert_allclose(float(out[0]), min(g, thr), rtol=1e-6)
  assert int(state.count) == IMAX and int(state.nonfinite_count) == IMAX


def test_autoclip_reference_agrees_before_saturation():
  # The sanity check for the test above: away from int32's end, the ring
  # buffer gives AutoClipRef's windowed percentile.
  tx = optax_zclip.autoclip(percentile=50.0, window=4)
  state = tx.init(None)
  ref = AutoClipRef(percentile=50.0, window=4)
  for g in [1.0, 2.0, 3.0, 4.0, 5.0] + FEED:
    out, state = tx.update(jnp.array([g], jnp.float32), state)
    scale, thr = ref.step(g)
    np.testing.assert_allclose(float(state.threshold), thr, rtol=1e-6)
    if math.isfinite(g):
      np.testing.assert_allclose(float(out[0]), g * scale, rtol=1e-6)


# --------------------------------------------------------------------------
# Every clipping transform of the registry: a long scanned run, and its
# counters at int32's end.


def _leaf_norm_at(t):
  """A second leaf's value at step ``t``: another drift, other spikes."""
  tf = t.astype(jnp.float32)
  base = 0.6 + 0.2 * jnp.cos(tf / 31.0) + 0.1 * jnp.exp(-tf / 2500.0)
  return base * jnp.where(t % 613 == 300, 12.0, 1.0)


@functools.cache
def _registry_scan(name):
  """``name``'s transform over N steps of a two-leaf gradient, under one
  jitted `jax.lax.scan`: the leaves fed and the leaves out, per step."""
  tx = TRANSFORMS[name].make()

  def body(state, t):
    grads = [jnp.stack([_norm_at(t)]), jnp.stack([_leaf_norm_at(t)])]
    out, state = tx.update(grads, state)
    return state, (jnp.concatenate(grads), jnp.concatenate(out))

  state, (fed, out) = jax.jit(lambda: jax.lax.scan(
      body, tx.init([jnp.zeros(1)] * 2), jnp.arange(N)))()
  return state, np.asarray(fed, np.float64), np.asarray(out, np.float64)


@pytest.mark.parametrize("name", CLIPPERS)
def test_every_transform_tracks_its_float64_reference_for_20000_steps(name):
  state, fed, out = _registry_scan(name)
  ref = TRANSFORMS[name].reference()
  # The reference is fed the very float32 values the transform saw.
  scales = np.asarray([ref.step([x[:1], x[1:]]) for x in fed])
  # Every step's factors, to float32 rounding: a decision that float32 and
  # float64 take differently is one where the norm is at its limit, where
  # the factor is 1 either way.
  np.testing.assert_allclose(out / fed, scales, rtol=1e-4)
  assert int(state.count) == ref.count == N
  assert int(state.nonfinite_count) == ref.nonfinite_count == 0
  clipped = np.flatnonzero(scales.min(axis=1) < 1 - 1e-3)
  if TRANSFORMS[name].clips:
    # The late spikes are still clipped: nothing drifted off.
    assert {t for t in range(N) if t % 997 == 500 or t % 613 == 300
            } - {0} <= set(clipped), name
  else:
    assert clipped.size == 0


@pytest.mark.parametrize("name", CLIPPERS)
def test_every_transforms_counters_saturate_at_the_int32_maximum(name):
  e = TRANSFORMS[name]
  tx = e.make()
  update = jax.jit(tx.update)
  state = tx.init(jnp.zeros(1))
  # Past the warm-up, with a full history (AutoClip's window: a count at
  # int32's end says the whole ring buffer is valid).
  history = [1.0, 1.2, 0.9, 1.1, 1.0] * 4
  assert max(e.warmup, e.config.get("window", 0)) < len(history)
  for g in history:
    _, state = update(jnp.array([g]), state)
  # Every int32 scalar of the state (the counters), one step from the end.
  near = {f: jnp.asarray(IMAX - 1, jnp.int32)
          for f, x in state._asdict().items()
          if getattr(x, "dtype", None) == jnp.int32 and x.shape == ()}
  assert {"count", "nonfinite_count"} <= set(near)
  state = state._replace(**near)
  for g in FEED:
    out, state = update(jnp.array([g], jnp.float32), state)
    for f in near:  # saturated (or reset, as a run of spikes), not wrapped
      assert 0 <= int(getattr(state, f)) <= IMAX, f
    if math.isfinite(g):
      assert 0 < float(out[0]) <= g * (1 + 1e-6)
    else:  # passed through, for optax.apply_if_finite
      np.testing.assert_array_equal(np.asarray(out), np.float32([g]))
  assert int(state.count) == IMAX and int(state.nonfinite_count) == IMAX
