"""The transforms inside Optax's wrappers, checked against float64 references.

`optax.MultiSteps` (clipping sees the accumulated mean gradient, once per
real step), `optax.apply_if_finite` (a skipped step leaves the clipping state
bit-identical, and giving up on NaNs does not poison it), `optax.masked` and
``None`` leaves (clipping sees only the other leaves) and
`optax.inject_hyperparams` with a schedule for ``z_thresh``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references import SEQ, AdaGCRef, AutoClipRef, ZClipRef, tree_norm64

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


def _sgd_step(tx):

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


# --------------------------------------------------------------------------
# optax.MultiSteps


def test_multisteps_clips_the_mean_gradient_once_per_real_step():
  k, cfg = 3, dict(warmup_steps=4, max_grad_norm=None)
  tx = optax.MultiSteps(optax.chain(optax_zclip.zclip(**cfg), optax.sgd(LR)),
                        every_k_schedule=k)
  step = _sgd_step(tx)
  params = _params0()
  state = tx.init(params)
  ref = ZClipRef(**cfg)
  want = {key: np.ones(v.shape) for key, v in SEQ[0].items()}
  real_steps = 0
  for i in range(0, 90, k):
    micro = SEQ[i:i + k]
    for j, grads in enumerate(micro):
      before_params, before_zclip = params, state.inner_opt_state[0]
      params, state = step(params, state, grads)
      if j < k - 1:  # a micro-step: nothing applied, ZClip untouched
        _assert_bit_identical(params, before_params, f"micro {i + j}")
        _assert_bit_identical(state.inner_opt_state[0], before_zclip,
                              f"micro {i + j}")
    real_steps += 1
    mean = {key: np.mean([np.asarray(m[key], np.float64) for m in micro],
                         axis=0) for key in KEYS}
    g = tree_norm64(mean.values())
    scale = ref.step(g)["scale"]
    for key in KEYS:
      want[key] = want[key] - LR * scale * mean[key]
      np.testing.assert_allclose(params[key], want[key], rtol=2e-6,
                                 atol=2e-6, err_msg=f"real step {real_steps}")
    s = optax_zclip.stats(state)
    np.testing.assert_allclose(float(s["zclip/grad_norm"]), g, rtol=2e-6)
    assert int(s["zclip/count"]) == real_steps
    assert int(s["zclip/spike_count"]) == ref.spikes
  assert ref.spikes >= 2 and real_steps == 30


# --------------------------------------------------------------------------
# optax.apply_if_finite


def _poison(grads, value=np.nan):
  bad = {key: np.array(v) for key, v in grads.items()}
  bad["w2"][1, 0, 2] = value
  return bad


def _zclip_sgd_if_finite(cfg):
  """``(step, params, state)`` of apply_if_finite(chain(zclip, sgd), 2)."""
  tx = optax.apply_if_finite(
      optax.chain(optax_zclip.zclip(**cfg), optax.sgd(LR)),
      max_consecutive_errors=2)
  params = _params0()
  return _sgd_step(tx), params, tx.init(params)


@pytest.mark.parametrize("at", [3, 20])  # in ZClip's warm-up, after it
def test_apply_if_finite_skips_a_nan_step_and_zclip_state_is_untouched(at):
  cfg = dict(warmup_steps=5)
  step, params, state = _zclip_sgd_if_finite(cfg)
  clean_params, clean_state = params, state
  ref = ZClipRef(**cfg)
  want = {key: np.ones(v.shape) for key, v in SEQ[0].items()}
  for t, grads in enumerate(SEQ[:45]):
    if t == at:
      for value in (np.nan, np.inf):  # two bad steps in a row, both skipped
        before_params, before_zclip = params, state.inner_state[0]
        params, state = step(params, state, _poison(grads, value))
        _assert_bit_identical(params, before_params, "skipped step")
        _assert_bit_identical(state.inner_state[0], before_zclip,
                              "ZClip state across the skipped step")
      assert int(state.notfinite_count) == 2
      assert int(state.total_notfinite) == 2
      assert not bool(state.last_finite)
    params, state = step(params, state, grads)
    clean_params, clean_state = step(clean_params, clean_state, grads)
    scale = ref.step(tree_norm64(grads.values()))["scale"]
    for key in KEYS:
      want[key] = want[key] - LR * scale * np.asarray(grads[key], np.float64)
  assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 2
  # As if the bad steps had not happened: equal to the run without them...
  _assert_bit_identical(params, clean_params)
  _assert_bit_identical(state.inner_state, clean_state.inner_state)
  # ...which is the float64 reference's run.
  for key in KEYS:
    np.testing.assert_allclose(params[key], want[key], rtol=1e-5, atol=1e-6)
  zs = state.inner_state[0]
  assert int(zs.spike_count) == ref.spikes >= 2
  assert int(zs.nonfinite_count) == 0  # ZClip never saw the bad steps
  np.testing.assert_allclose(float(zs.mean), ref.mean, rtol=1e-5)


def test_when_apply_if_finite_gives_up_zclip_statistics_stay_clean():
  # After max_consecutive_errors skipped steps the NaN reaches ZClip: it
  # passes through (the params are lost, as without ZClip), but ZClip's own
  # statistics stay finite and carry on as if the NaNs had never come.
  cfg = dict(warmup_steps=5)
  step, params, state = _zclip_sgd_if_finite(cfg)
  ref = ZClipRef(**cfg)
  for grads in SEQ[:20]:
    params, state = step(params, state, grads)
    ref.step(tree_norm64(grads.values()))
  before = state.inner_state[0]
  for _ in range(3):
    params, state = step(params, state, _poison(SEQ[20]))
  assert int(state.total_notfinite) == 3
  zs = state.inner_state[0]
  assert int(zs.nonfinite_count) == 1  # the third one got through
  assert np.isnan(float(zs.grad_norm))
  for f in ("count", "mean", "var", "spike_count"):
    np.testing.assert_array_equal(_bits(getattr(zs, f)),
                                  _bits(getattr(before, f)), err_msg=f)
  assert np.isnan(np.asarray(params["w2"])).any()  # sgd applied the NaN
  for grads in SEQ[20:60]:
    params, state = step(params, state, grads)
    r = ref.step(tree_norm64(grads.values()))
    zs = state.inner_state[0]
    np.testing.assert_allclose(float(zs.clipped_norm) / float(zs.grad_norm),
                               r["scale"], rtol=1e-5)
  assert int(zs.spike_count) == ref.spikes >= 3
  np.testing.assert_allclose(float(zs.mean), ref.mean, rtol=1e-5)
  np.testing.assert_allclose(float(zs.var), ref.var, rtol=1e-4)


# --------------------------------------------------------------------------
# optax.masked and None leaves


def _clip_and_ref(kind):
  """A transform, its reference, and the reference's scale per leaf."""
  if kind == "zclip":
    ref = ZClipRef(warmup_steps=5)
    return (optax_zclip.zclip(warmup_steps=5), ref,
            lambda leaves: [ref.step(tree_norm64(leaves))["scale"]]
            * len(leaves))
  if kind == "adagc":
    ref = AdaGCRef(warmup_steps=5)
    return optax_zclip.adagc(warmup_steps=5), ref, ref.step
  ref = AutoClipRef(percentile=30.0, window=8)
  return (optax_zclip.autoclip(percentile=30.0, window=8), ref,
          lambda leaves: [ref.step(tree_norm64(leaves))[0]] * len(leaves))


@pytest.mark.parametrize("kind", ["zclip", "adagc", "autoclip"])
def test_masked_clipping_sees_only_the_unmasked_leaves(kind):
  clip, _, ref_scales = _clip_and_ref(kind)
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
  assert scaled_down >= 3


@pytest.mark.parametrize("kind", ["zclip", "adagc", "autoclip"])
def test_none_leaves_are_kept_and_not_counted(kind):
  clip, _, ref_scales = _clip_and_ref(kind)
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
