"""Property-based tests (hypothesis): what clipping may never do.

For random finite gradient trees (random shapes, empty leaves included, leaf
magnitudes from 1e-6 to 1e6), random valid hyperparameters and a random
history before the step (warm-up, or after it, with spikes in it):

* the outputs are the gradients times one scalar (`zclip`, `autoclip`) or
  times one scalar per leaf (`adagc`), each in (0, 1]: no element grows or
  changes sign;
* the output norm never exceeds the limit that applies: ``max_grad_norm``,
  the clip value of a spike (computed here in float64 from the state before
  the step, by the reference code's formulas), AutoClip's percentile
  (NumPy's), AdaGC's ``lambda_rel * gamma_i`` (``gamma_i`` the leaf's own
  norm at its first sight), all within float32 rounding (1e-5 relative);
* a gradient below every limit passes through bit-identical;
* every clipping transform of the registry (transforms.py), as configured
  there, scales each leaf by the factor its float64 reference gives after
  the same history.

The history is fed through one jitted `jax.lax.scan` per static
configuration, with the hyperparameters traced (so hypothesis does not
trigger a compile per example); ZClip's and AutoClip's states depend only on
the norms, and AdaGC's only on each leaf's norm, so the history runs on
one-element stand-in leaves. The final step runs eagerly on the real tree.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transforms import CLIPPERS, TRANSFORMS

import optax_zclip

H = 40  # longest history; shorter ones are padded and masked
L = 5  # most leaves in a tree
RTOL = 1e-5

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    database=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------
# Strategies


@st.composite
def grad_trees(draw):
  """A list of 1..L float32 leaves of random shapes and magnitudes."""
  n = draw(st.integers(1, L))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  leaves = []
  for _ in range(n):
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    magnitude = 10.0 ** draw(st.floats(-6, 6))
    leaves.append((rng.standard_normal(shape) * magnitude).astype(np.float32))
  return leaves


@st.composite
def histories(draw, width=None):
  """Up to H past norms (``width`` of them per step when given): a random
  scale, log-normal noise and a few spikes."""
  n = draw(st.integers(0, H))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  shape = (n,) if width is None else (n, width)
  scale = 10.0 ** draw(st.floats(-6, 6, width=32))
  noise = np.exp(draw(st.floats(0, 1.5)) * rng.standard_normal(shape))
  spikes = np.where(rng.random(shape) < 0.05, 10 ** rng.uniform(0, 2, shape),
                    1.0)
  return (scale * noise * spikes).astype(np.float32)


caps = st.one_of(st.none(), st.floats(-6, 6).map(lambda e: 10.0**e))

ZCLIP_HPARAMS = st.fixed_dictionaries(dict(
    alpha=st.floats(0.5, 0.999), z_thresh=st.floats(0.5, 4.0),
    max_grad_norm=caps, eps=st.sampled_from([0.0, 1e-8, 1e-6, 1e-3]),
    warmup_steps=st.integers(1, 10),
    mode=st.sampled_from(["zscore", "percentile"]),
    clip_option=st.sampled_from(["adaptive_scaling", "mean", "max"]),
    clip_factor=st.floats(0.3, 2.0), skip_update_on_spike=st.booleans()))

ADAGC_HPARAMS = st.fixed_dictionaries(dict(
    lambda_rel=st.floats(0.5, 3.0), beta=st.floats(0.5, 0.999),
    warmup_steps=st.integers(1, 10), max_grad_norm=caps,
    eps=st.sampled_from([0.0, 1e-8, 1e-6])))


# --------------------------------------------------------------------------
# Helpers


def _pad(history):
  """``history`` padded to H rows, and the mask of real rows."""
  n = history.shape[0]
  pad = np.zeros((H - n,) + history.shape[1:], np.float32)
  return np.concatenate([history, pad]), np.arange(H) < n


def _scan_masked(tx, state, stand_ins, valid):
  def body(state, x):
    grads, ok = x
    _, new = tx.update(grads, state)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state), None
  return jax.lax.scan(body, state, (stand_ins, valid))[0]


def _traced(hp, names):
  """The numeric hyperparameters as arrays (traced inside jit)."""
  return {k: jnp.asarray(hp[k]) for k in names}


@functools.partial(jax.jit, static_argnames=("mode", "clip_option",
                                             "capped"))
def _zclip_history(norms, valid, hp, *, mode, clip_option, capped):
  cap = hp.pop("max_grad_norm")
  tx = optax_zclip.zclip(**hp, mode=mode, clip_option=clip_option,
                         max_grad_norm=cap if capped else None)
  return _scan_masked(tx, tx.init(None), norms[:, None], valid)


@functools.partial(jax.jit, static_argnames=("window",))
def _autoclip_history(norms, valid, percentile, *, window):
  tx = optax_zclip.autoclip(percentile=percentile, window=window)
  return _scan_masked(tx, tx.init(None), norms[:, None], valid)


@functools.partial(jax.jit, static_argnames=("capped",))
def _adagc_history(norms, valid, hp, *, capped):
  cap = hp.pop("max_grad_norm")
  tx = optax_zclip.adagc(**hp, max_grad_norm=cap if capped else None)
  stand_ins = [norms[:, i:i + 1] for i in range(L)]  # one (1,) leaf each
  state = tx.init([jnp.zeros(1)] * L)
  return _scan_masked(tx, state, stand_ins, valid)


def _zclip_state_after(hp, history):
  norms, valid = _pad(history)
  traced = _traced(hp, ["alpha", "z_thresh", "eps", "warmup_steps",
                        "clip_factor", "skip_update_on_spike"])
  traced["max_grad_norm"] = jnp.asarray(hp["max_grad_norm"] or 1.0)
  return _zclip_history(norms, valid, traced, mode=hp["mode"],
                        clip_option=hp["clip_option"],
                        capped=hp["max_grad_norm"] is not None)


def _norm64(leaves):
  return math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                       for x in leaves))


def _check_scaled_copy(grads, out, tol=1e-6):
  """``out`` is ``grads`` times one scalar in (0, 1]; returns the scalar.

  Elementwise: no magnitude grows and no sign flips (exactly), and the
  ratios agree with each other to float32 rounding.
  """
  ratios = []
  for x, y in zip(grads, out, strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert y.shape == x.shape
    assert np.all(np.abs(y) <= np.abs(x))
    assert np.all(y * x >= 0)
    big = np.abs(x) > 1e-30  # ratios of tiny values lose their precision
    ratios.append((y[big] / x[big]).ravel())
  ratios = np.concatenate(ratios) if ratios else np.zeros(0)
  if ratios.size == 0:
    return 1.0
  s = float(np.median(ratios))
  assert 0 < s <= 1
  np.testing.assert_allclose(ratios, s, rtol=tol)
  return s


def _bit_identical(grads, out):
  for x, y in zip(grads, out, strict=True):
    np.testing.assert_array_equal(np.asarray(y).view(np.uint32),
                                  np.asarray(x).view(np.uint32))


def _zclip_clip_value(hp, mean, var, g):
  """ZClip's clip value on a spike, in float64, from the pre-step state."""
  std = math.sqrt(var)
  zt = hp["z_thresh"]
  if hp["mode"] == "percentile" or hp["clip_option"] == "max":
    return mean + zt * std
  if hp["clip_option"] == "mean":
    return mean
  z = (g - mean) / (std + hp["eps"]) if std + hp["eps"] > 0 else math.inf
  return (mean + zt * zt * std / z) * hp["clip_factor"]


def _zclip_bound(hp, mean, var):
  """The norm above which a step is a spike (after warm-up), in float64."""
  std = math.sqrt(var)
  if hp["mode"] == "percentile":
    return mean + hp["z_thresh"] * std
  return mean + hp["z_thresh"] * (std + hp["eps"])


# --------------------------------------------------------------------------
# ZClip


@pytest.mark.slow
@SETTINGS
@given(hp=ZCLIP_HPARAMS, history=histories(), grads=grad_trees())
def test_zclip_scales_by_one_factor_and_respects_every_limit(hp, history,
                                                             grads):
  before = _zclip_state_after(hp, history)
  out, after = optax_zclip.zclip(**hp).update(grads, before)
  g32 = float(after.grad_norm)
  g = _norm64(grads)
  assert math.isclose(g32, g, rel_tol=1e-5, abs_tol=1e-30)
  _check_scaled_copy(grads, out)
  out_norm = _norm64(out)
  assert out_norm <= g
  cap = hp["max_grad_norm"]
  if cap is not None:
    assert out_norm <= cap * (1 + RTOL)
  warm = int(before.count) < hp["warmup_steps"]
  spike = int(after.spike_count) == int(before.spike_count) + 1
  mean, var = float(before.mean), float(before.var)
  if warm:
    assert not spike
  else:
    # The decision, where float32 cannot have flipped it.
    bound = _zclip_bound(hp, mean, var)
    if g > bound * (1 + 1e-4) + 1e-30:
      assert spike
    elif g < bound * (1 - 1e-4):
      assert not spike
  event("warm-up" if warm else "spike" if spike else "no spike")
  event("clipped" if out_norm < g * (1 - RTOL) else "unchanged")
  if spike:
    c = _zclip_clip_value(hp, mean, var, g32)
    assert 0 < c and out_norm <= c * (1 + RTOL)
  if not spike and (cap is None or g < cap * (1 - RTOL)):
    _bit_identical(grads, out)


@pytest.mark.slow
@SETTINGS
@given(hp=ZCLIP_HPARAMS, history=histories(), grads=grad_trees(),
       frac=st.floats(0.0, 0.99))
def test_zclip_passes_a_gradient_below_the_threshold_bit_identical(
    hp, history, grads, frac):
  before = _zclip_state_after(hp, history)
  limit = math.inf
  if int(before.count) >= hp["warmup_steps"]:
    limit = _zclip_bound(hp, float(before.mean), float(before.var))
  if hp["max_grad_norm"] is not None:
    limit = min(limit, hp["max_grad_norm"])
  g = _norm64(grads)
  if math.isfinite(limit) and g > 0:
    # Rescale the tree to ``frac`` of the limit (float64, then float32).
    grads = [(np.asarray(x, np.float64) * (frac * limit / g))
             .astype(np.float32) for x in grads]
  # XLA on CPU flushes subnormal floats to zero in arithmetic (even in
  # ``x * 1.0``); such values are not what this property is about.
  grads = [np.where(np.abs(x) < np.finfo(np.float32).tiny, 0, x)
           .astype(np.float32) for x in grads]
  event("limit " + ("inf" if math.isinf(limit) else "finite"))
  out, after = optax_zclip.zclip(**hp).update(grads, before)
  _bit_identical(grads, out)
  assert int(after.spike_count) == int(before.spike_count)
  assert float(after.clipped_norm) == float(after.grad_norm)


# --------------------------------------------------------------------------
# AutoClip


@pytest.mark.slow
@SETTINGS
@given(percentile=st.floats(0.0, 100.0), window=st.sampled_from([4, 32]),
       history=histories(), grads=grad_trees())
def test_autoclip_clips_to_the_numpy_percentile(percentile, window, history,
                                                grads):
  norms, valid = _pad(history)
  before = _autoclip_history(norms, valid, jnp.asarray(percentile),
                             window=window)
  tx = optax_zclip.autoclip(percentile=percentile, window=window)
  out, after = tx.update(grads, before)
  g32 = float(after.grad_norm)
  g = _norm64(grads)
  recorded = np.concatenate([history, [g32]]).astype(np.float64)[-window:]
  thr = float(np.percentile(recorded, percentile))
  # atol: a percentile between 0 and a norm can be a float64 subnormal that
  # float32 cannot hold.
  np.testing.assert_allclose(float(after.threshold), thr, rtol=RTOL,
                             atol=1e-37)
  _check_scaled_copy(grads, out)
  out_norm = _norm64(out)
  assert out_norm <= g and out_norm <= thr * (1 + RTOL)
  event("clipped" if out_norm < g * (1 - RTOL) else "unchanged")
  if g < thr * (1 - RTOL):
    _bit_identical(grads, out)


# --------------------------------------------------------------------------
# AdaGC


@pytest.mark.slow
@SETTINGS
@given(hp=ADAGC_HPARAMS, data=st.data(), grads=grad_trees())
def test_adagc_scales_each_leaf_by_one_factor_within_its_limit(hp, data,
                                                               grads):
  history = data.draw(histories(width=L))
  norms, valid = _pad(history)
  traced = _traced(hp, ["lambda_rel", "beta", "warmup_steps", "eps"])
  traced["max_grad_norm"] = jnp.asarray(hp["max_grad_norm"] or 1.0)
  stand_in = _adagc_history(norms, valid, traced,
                            capped=hp["max_grad_norm"] is not None)
  # The first len(grads) stand-in leaves' gammas, in the real tree's shape.
  before = stand_in._replace(gamma=list(stand_in.gamma[:len(grads)]))
  out, after = optax_zclip.adagc(**hp).update(grads, before)
  assert jax.tree.structure(after.gamma) == jax.tree.structure(grads)
  warm = int(before.count) < hp["warmup_steps"]
  scales = [_check_scaled_copy([x], [y])
            for x, y in zip(grads, out, strict=True)]
  cap = hp["max_grad_norm"]
  event("warm-up" if warm else "after warm-up")
  event(f"{sum(s < 1 for s in scales)} of {len(scales)} leaves clipped")
  if warm:
    # One global factor for all leaves, capping the global norm.
    nonzero = [s for x, s in zip(grads, scales, strict=True) if np.any(x != 0)]
    np.testing.assert_allclose(nonzero, nonzero[:1] * len(nonzero),
                               rtol=1e-6)
    if cap is not None:
      assert _norm64(out) <= cap * (1 + RTOL)
    return
  for x, y, gamma in zip(grads, out, before.gamma, strict=True):
    n, gamma = _norm64([x]), float(gamma)
    if n == 0:  # not an observation: passes through
      _bit_identical([x], [y])
      continue
    if not math.isfinite(gamma):
      gamma = n  # first sight of this leaf: its own norm is its reference
    limit = hp["lambda_rel"] * gamma
    assert _norm64([y]) <= limit * (1 + RTOL)
    if n < limit * (1 - RTOL):  # clipped only when n > limit
      _bit_identical([x], [y])


# --------------------------------------------------------------------------
# Every clipping transform of the registry, as configured there


@functools.partial(jax.jit, static_argnames=("name", "n"))
def _registry_history(norms, valid, *, name, n):
  """The state of ``name``'s transform after the history, on ``n`` one-element
  stand-in leaves (one column of ``norms`` each): a state for any tree of
  ``n`` leaves in a list, since the states depend only on the norms."""
  tx = TRANSFORMS[name].make()
  state = tx.init([jnp.zeros(1)] * n)
  return _scan_masked(tx, state, [norms[:, i:i + 1] for i in range(n)], valid)


@pytest.mark.slow
@pytest.mark.parametrize("name", CLIPPERS)
@settings(SETTINGS, max_examples=15)
@given(data=st.data(), grads=grad_trees())
def test_every_transform_scales_as_its_float64_reference(name, data, grads):
  e = TRANSFORMS[name]
  n = len(grads)
  history = data.draw(histories(width=L))[:, :n]
  norms, valid = _pad(history)
  before = _registry_history(norms, valid, name=name, n=n)
  ref = e.reference()
  for row in history:  # the very float32 norms the transform saw
    ref.step([row[i:i + 1] for i in range(n)])
  out, after = e.make().update(grads, before)
  scales = ref.step(grads)
  assert math.isclose(float(after.grad_norm), _norm64(grads), rel_tol=1e-5,
                      abs_tol=1e-30)
  # Each leaf times one factor in (0, 1], and that factor the reference's
  # (one factor for the whole tree, unless the entry clips per tensor).
  got = [_check_scaled_copy([x], [y]) for x, y in zip(grads, out,
                                                      strict=True)]
  live = [i for i, x in enumerate(grads) if np.any(np.abs(x) > 1e-30)]
  np.testing.assert_allclose([got[i] for i in live],
                             [scales[i] for i in live], rtol=1e-4)
  if not e.per_tensor and live:
    np.testing.assert_allclose([got[i] for i in live], got[live[0]],
                               rtol=1e-6)
  assert _norm64(out) <= _norm64(grads)
  event("clipped" if min(scales) < 1 - RTOL else "unchanged")
