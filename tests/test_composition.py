"""The transforms inside Optax's wrappers, checked against float64 references.

`optax.MultiSteps` (clipping sees the accumulated mean gradient, once per
real step), `optax.apply_if_finite` (a skipped step leaves the clipping state
bit-identical, and giving up on NaNs does not poison it), `optax.masked` and
``None`` leaves (clipping sees only the other leaves) and
`optax.inject_hyperparams` (the same steps with injected hyperparameters,
and one of them on a schedule), for every clipping transform of the registry
(transforms.py); ZClip's ``z_thresh`` schedule is checked in detail.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references import SEQ, ZClipRef, tree_norm64
from transforms import CLIPPERS, TRANSFORMS

import optax_zclip

LR = 0.1
KEYS = sorted(SEQ[0])  # the order of jax.tree.leaves on these dicts


def _bits(x):
  a = np.asarray(x)
  return a.view(f"u{a.dtype.itemsize}")


def _assert_bit_identical(a, b, msg=""):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b), msg
  for x, y in zip(la, lb, strict=True):
    np.testing.assert_array_equal(_bits(x), _bits(y), err_msg=msg)


def _params0():
  return {k: jnp.ones(v.shape, jnp.float32) for k, v in SEQ[0].items()}


def _ref_scales(name):
  """A fresh float64 reference of ``name``: leaves -> scale per leaf."""
  ref = TRANSFORMS[name].reference()
  return ref, ref.step


def _sgd_step(tx):

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


# --------------------------------------------------------------------------
# optax.MultiSteps


@pytest.mark.parametrize("name", CLIPPERS)
def test_multisteps_clips_the_mean_gradient_once_per_real_step(name):
  k, kind = 3, TRANSFORMS[name].kind
  tx = optax.MultiSteps(optax.chain(TRANSFORMS[name].make(), optax.sgd(LR)),
                        every_k_schedule=k)
  step = _sgd_step(tx)
  params = _params0()
  state = tx.init(params)
  ref, ref_scales = _ref_scales(name)
  clipped = 0
  want = {key: np.ones(v.shape) for key, v in SEQ[0].items()}
  real_steps = 0
  for i in range(0, 90, k):
    micro = SEQ[i:i + k]
    for j, grads in enumerate(micro):
      before_params, before_clip = params, state.inner_opt_state[0]
      params, state = step(params, state, grads)
      if j < k - 1:  # a micro-step: nothing applied, the clipping untouched
        _assert_bit_identical(params, before_params, f"micro {i + j}")
        _assert_bit_identical(state.inner_opt_state[0], before_clip,
                              f"micro {i + j}")
    real_steps += 1
    mean = {key: np.mean([np.asarray(m[key], np.float64) for m in micro],
                         axis=0) for key in KEYS}
    g = tree_norm64(mean.values())
    scales = ref_scales([mean[key] for key in KEYS])
    clipped += min(scales) < 1
    for key, scale in zip(KEYS, scales, strict=True):
      want[key] = want[key] - LR * scale * mean[key]
      np.testing.assert_allclose(params[key], want[key], rtol=2e-6,
                                 atol=2e-6, err_msg=f"real step {real_steps}")
    s = optax_zclip.stats(state)
    np.testing.assert_allclose(float(s[f"{kind}/grad_norm"]), g, rtol=2e-6)
    assert int(s[f"{kind}/count"]) == real_steps == ref.count
    if kind == "zclip":
      assert int(s["zclip/spike_count"]) == ref.model.spikes
  assert real_steps == 30
  assert clipped >= 2 if TRANSFORMS[name].clips else clipped == 0


# --------------------------------------------------------------------------
# optax.apply_if_finite


def _poison(grads, value=np.nan):
  bad = {key: np.array(v) for key, v in grads.items()}
  bad["w2"][1, 0, 2] = value
  return bad


def _sgd_if_finite(clip):
  """``(step, params, state)`` of apply_if_finite(chain(clip, sgd), 2)."""
  tx = optax.apply_if_finite(optax.chain(clip, optax.sgd(LR)),
                             max_consecutive_errors=2)
  params = _params0()
  return _sgd_step(tx), params, tx.init(params)


@pytest.mark.parametrize("at", [3, 20])  # in the warm-ups, after them
@pytest.mark.parametrize("name", CLIPPERS)
def test_apply_if_finite_skips_a_nan_step_and_the_clip_state_is_untouched(
    name, at):
  kind = TRANSFORMS[name].kind
  step, params, state = _sgd_if_finite(TRANSFORMS[name].make())
  clean_params, clean_state = params, state
  ref, ref_scales = _ref_scales(name)
  want = {key: np.ones(v.shape) for key, v in SEQ[0].items()}
  for t, grads in enumerate(SEQ[:45]):
    if t == at:
      for value in (np.nan, np.inf):  # two bad steps in a row, both skipped
        before_params, before_clip = params, state.inner_state[0]
        params, state = step(params, state, _poison(grads, value))
        _assert_bit_identical(params, before_params, "skipped step")
        _assert_bit_identical(state.inner_state[0], before_clip,
                              "clipping state across the skipped step")
      assert int(state.notfinite_count) == 2
      assert int(state.total_notfinite) == 2
      assert not bool(state.last_finite)
    params, state = step(params, state, grads)
    clean_params, clean_state = step(clean_params, clean_state, grads)
    scales = ref_scales([grads[key] for key in KEYS])
    for key, scale in zip(KEYS, scales, strict=True):
      want[key] = want[key] - LR * scale * np.asarray(grads[key], np.float64)
  assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 2
  # As if the bad steps had not happened: equal to the run without them...
  _assert_bit_identical(params, clean_params)
  _assert_bit_identical(state.inner_state, clean_state.inner_state)
  # ...which is the float64 reference's run.
  for key in KEYS:
    np.testing.assert_allclose(params[key], want[key], rtol=1e-5, atol=1e-6)
  cs = state.inner_state[0]
  assert int(cs.nonfinite_count) == 0  # the clipping never saw the bad steps
  assert int(cs.count) == ref.count == 45
  if kind == "zclip":
    assert int(cs.spike_count) == ref.model.spikes >= 2
    np.testing.assert_allclose(float(cs.mean), ref.model.mean, rtol=1e-5)


@pytest.mark.parametrize("name", CLIPPERS)
def test_when_apply_if_finite_gives_up_the_clip_statistics_stay_clean(name):
  # After max_consecutive_errors skipped steps the NaN reaches the clipping:
  # it passes through (the params are lost, as without clipping), but the
  # clipping's own statistics stay finite and carry on as if the NaNs had
  # never come (as the reference's, which sees the NaN step too).
  kind = TRANSFORMS[name].kind
  step, params, state = _sgd_if_finite(TRANSFORMS[name].make())
  ref, ref_scales = _ref_scales(name)
  for grads in SEQ[:20]:
    params, state = step(params, state, grads)
    ref_scales([grads[key] for key in KEYS])
  before = state.inner_state[0]
  for _ in range(3):
    params, state = step(params, state, _poison(SEQ[20]))
  ref_scales([_poison(SEQ[20])[key] for key in KEYS])
  assert int(state.total_notfinite) == 3
  cs = state.inner_state[0]
  assert int(cs.nonfinite_count) == ref.nonfinite_count == 1  # the third
  assert np.isnan(float(cs.grad_norm))
  np.testing.assert_array_equal(_bits(cs.count), _bits(before.count))
  if kind == "zclip":
    for f in ("mean", "var", "spike_count"):
      np.testing.assert_array_equal(_bits(getattr(cs, f)),
                                    _bits(getattr(before, f)), err_msg=f)
  assert np.isnan(np.asarray(params["w2"])).any()  # sgd applied the NaN
  for grads in SEQ[20:60]:
    params, state = step(params, state, grads)
    scales = ref_scales([grads[key] for key in KEYS])
    cs = state.inner_state[0]
    np.testing.assert_allclose(
        float(cs.clipped_norm),
        tree_norm64([np.asarray(grads[key], np.float64) * s
                     for key, s in zip(KEYS, scales, strict=True)]),
        rtol=1e-5)
  assert int(cs.count) == ref.count == 60  # the NaN step is not one
  if kind == "zclip":
    assert int(cs.spike_count) == ref.model.spikes >= 3
    np.testing.assert_allclose(float(cs.mean), ref.model.mean, rtol=1e-5)
    np.testing.assert_allclose(float(cs.var), ref.model.var, rtol=1e-4)


# --------------------------------------------------------------------------
# optax.masked and None leaves


@pytest.mark.parametrize("name", CLIPPERS)
def test_masked_clipping_sees_only_the_unmasked_leaves(name):
  clip = TRANSFORMS[name].make()
  _, ref_scales = _ref_scales(name)
  mask = {"w1": True, "b1": False, "w2": True}
  seen = ["w1", "w2"]
  tx = optax.masked(clip, mask)
  update = jax.jit(tx.update)
  state = tx.init(_params0())
  scaled_down = 0
  for t, grads in enumerate(SEQ[:60]):
    # The masked-out leaf is huge: were it counted, every step would clip.
    grads = dict(grads, b1=grads["b1"] * 1e4)
    out, state = update(grads, state)
    scales = ref_scales([np.asarray(grads[k], np.float64) for k in seen])
    np.testing.assert_array_equal(np.asarray(out["b1"]), grads["b1"])
    for k, s in zip(seen, scales, strict=True):
      np.testing.assert_allclose(np.asarray(out[k], np.float64),
                                 np.asarray(grads[k], np.float64) * s,
                                 rtol=2e-5, atol=1e-8, err_msg=f"{k} at {t}")
    np.testing.assert_allclose(
        float(state.inner_state.grad_norm),
        tree_norm64([grads[k] for k in seen]), rtol=1e-6)
    scaled_down += min(scales) < 1
  assert scaled_down >= 3 if TRANSFORMS[name].clips else scaled_down == 0


@pytest.mark.parametrize("name", CLIPPERS)
def test_none_leaves_are_kept_and_not_counted(name):
  clip = TRANSFORMS[name].make()
  _, ref_scales = _ref_scales(name)
  params = {"w1": jnp.ones((7, 5)), "frozen": None,
            "deep": [None, {"w2": jnp.ones((3, 2, 4)), "n": None}]}
  tx = optax.chain(clip, optax.sgd(LR))
  step = _sgd_step(tx)
  state = tx.init(params)
  want = {"w1": np.ones((7, 5)), "w2": np.ones((3, 2, 4))}
  for t, g in enumerate(SEQ[:40]):
    grads = {"w1": g["w1"], "frozen": None,
             "deep": [None, {"w2": g["w2"], "n": None}]}
    params, state = step(params, state, grads)
    assert jax.tree.structure(params) == jax.tree.structure(grads)
    assert params["frozen"] is None and params["deep"][0] is None
    assert params["deep"][1]["n"] is None
    leaves = [np.asarray(g["w1"], np.float64), np.asarray(g["w2"], np.float64)]
    np.testing.assert_allclose(float(state[0].grad_norm), tree_norm64(leaves),
                               rtol=1e-6)
    for k, leaf, s in zip(["w1", "w2"], leaves, ref_scales(leaves),
                          strict=True):
      want[k] = want[k] - LR * s * leaf
    np.testing.assert_allclose(params["w1"], want["w1"], rtol=1e-5,
                               atol=1e-6, err_msg=t)
    np.testing.assert_allclose(params["deep"][1]["w2"], want["w2"],
                               rtol=1e-5, atol=1e-6, err_msg=t)


# --------------------------------------------------------------------------
# optax.inject_hyperparams with a schedule


def _z_schedule(count):
  # From 3.0 down to 1.2 over 90 steps; a user's function of the step count.
  return 3.0 - 1.8 * jnp.minimum(count, 90) / 90


def test_inject_hyperparams_with_a_z_thresh_schedule():
  cfg = dict(warmup_steps=5, max_grad_norm=None)
  tx = optax.inject_hyperparams(optax_zclip.zclip)(z_thresh=_z_schedule,
                                                   **cfg)
  params = {k: jnp.zeros(v.shape) for k, v in SEQ[0].items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  ref = ZClipRef(**cfg)
  fixed = ZClipRef(**cfg, z_thresh=3.0)
  for t, grads in enumerate(SEQ):
    zt = 3.0 - 1.8 * min(t, 90) / 90  # float64, the same schedule
    ref.z_thresh = zt
    out, state = update(grads, state, params)
    np.testing.assert_allclose(float(state.hyperparams["z_thresh"]), zt,
                               rtol=1e-6)
    g = tree_norm64(grads.values())
    r = ref.step(g)
    fixed.step(g)
    np.testing.assert_allclose(tree_norm64(out.values()) / g, r["scale"],
                               rtol=1e-5, err_msg=t)
    zs = state.inner_state
    assert int(zs.spike_count) == ref.spikes, t
    if not r["warmup"]:
      np.testing.assert_allclose(float(zs.z_score), r["z"], rtol=1e-4,
                                 atol=1e-4,
                                 err_msg=t)
      # Well posed: no z-score within float error of its threshold.
      assert abs(r["z"] - zt) > 0.1
  np.testing.assert_allclose(float(zs.mean), ref.mean, rtol=1e-5)
  # The schedule mattered: a fixed z_thresh of 3.0 flags fewer spikes.
  assert ref.spikes > fixed.spikes >= 5


@pytest.mark.parametrize("name", CLIPPERS)
def test_inject_hyperparams_every_transform_with_a_schedule(name):
  # Every numeric argument injected (the static ones, such as a window size,
  # left as they are), and the one the entry names on a schedule: from its
  # value down to 60% of it over 90 steps. The reference is told each
  # step's value.
  e = TRANSFORMS[name]
  config = dict(e.config)
  if e.scheduled is not None:
    start = config.pop(e.scheduled, inspect.signature(e.factory)
                       .parameters[e.scheduled].default)
    config[e.scheduled] = lambda count: start * (
        1.0 - 0.4 * jnp.minimum(count, 90) / 90)
  tx = optax.inject_hyperparams(e.factory, static_args=e.static_args)(
      **config)
  params = {k: jnp.zeros(v.shape) for k, v in SEQ[0].items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  ref, ref_scales = _ref_scales(name)
  clipped = 0
  for t, grads in enumerate(SEQ):
    if e.scheduled is not None:
      value = start * (1.0 - 0.4 * min(t, 90) / 90)  # float64
      setattr(ref.model, e.scheduled, value)
    out, state = update(grads, state, params)
    if e.scheduled is not None:
      np.testing.assert_allclose(float(state.hyperparams[e.scheduled]),
                                 value, rtol=1e-6)
    scales = ref_scales([grads[key] for key in KEYS])
    clipped += min(scales) < 1
    for key, s in zip(KEYS, scales, strict=True):
      np.testing.assert_allclose(np.asarray(out[key], np.float64),
                                 np.asarray(grads[key], np.float64) * s,
                                 rtol=1e-4, atol=1e-8, err_msg=f"{key} {t}")
    assert int(state.inner_state.count) == ref.count
  assert clipped >= 3 if e.clips else clipped == 0
