"""`autoclip` step by step against `np.percentile` over the kept norms."""

import bad_values
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references import SEQ, AutoClipRef, run_without_host_transfer, tree_norm64

import optax_zclip

CONFIGS = [(10.0, 1024), (10.0, 7), (50.0, 5), (90.0, 16), (0.0, 8),
           (100.0, 3), (37.5, 1)]


@pytest.mark.parametrize("percentile,window", CONFIGS)
def test_matches_numpy_percentile_of_the_window(percentile, window):
  tx = optax_zclip.autoclip(percentile=percentile, window=window)
  ref = AutoClipRef(percentile=percentile, window=window)
  step = jax.jit(tx.update)
  state = tx.init(SEQ[0])
  clipped = 0
  for t, grads in enumerate(SEQ):
    out, state = step(grads, state)
    scale, thr = ref.step(tree_norm64(grads.values()))
    clipped += scale < 1
    for k in grads:
      np.testing.assert_allclose(np.asarray(out[k], np.float64),
                                 grads[k] * scale, rtol=1e-5, atol=1e-8,
                                 err_msg=f"step {t} leaf {k}")
    np.testing.assert_allclose(state.threshold, thr, rtol=1e-5)
    assert int(state.count) == t + 1
    assert state.history.dtype == jnp.float32
  if 0 < percentile < 100 and window > 1:
    assert clipped >= 10


def test_hand_worked_percentiles():
  # Norms 4, 1, 3, 2 with the 25th percentile and a window of 3.
  # Step 1: [4] -> 4. Step 2: [4, 1] -> 1 + 0.25 * 3 = 1.75; 1 < 1.75.
  # Step 3: [4, 1, 3] sorted [1, 3, 4], pos 0.5 -> 2; 3 clipped to 2.
  # Step 4: window [1, 3, 2] sorted [1, 2, 3], pos 0.5 -> 1.5; 2 -> 1.5.
  tx = optax_zclip.autoclip(percentile=25.0, window=3)
  state = tx.init(None)
  expected = [(4.0, 4.0), (1.0, 1.75), (2.0, 2.0), (1.5, 1.5)]
  for g, (out_norm, thr) in zip([4.0, 1.0, 3.0, 2.0], expected, strict=True):
    out, state = tx.update(jnp.array([g]), state)
    np.testing.assert_allclose(out, [out_norm], rtol=1e-6)
    np.testing.assert_allclose(state.threshold, thr, rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_norm_is_not_recorded(bad):
  tx = optax_zclip.autoclip(window=8)
  step = jax.jit(tx.update)
  state = tx.init(SEQ[0])
  for grads in SEQ[:12]:
    _, state = step(grads, state)
  poisoned = dict(SEQ[12])
  poisoned["w1"] = poisoned["w1"].copy()
  poisoned["w1"][0, 0] = bad
  out, new = step(poisoned, state)
  for f in ("count", "history"):
    np.testing.assert_array_equal(getattr(new, f), getattr(state, f))
  assert int(new.nonfinite_count) == 1
  for k in poisoned:
    np.testing.assert_array_equal(out[k], poisoned[k])


def test_first_step_nan_zero_and_empty():
  tx = optax_zclip.autoclip(window=4)
  state = tx.init(None)
  out, state = tx.update(jnp.array([np.nan]), state)
  assert float(state.threshold) == np.inf and int(state.count) == 0
  for tree in (jnp.zeros(3), {}, None, {"masked": None, "b": jnp.zeros(2)}):
    s = tx.init(tree)
    for _ in range(3):
      o, s = jax.jit(tx.update)(tree, s)
    assert jax.tree.structure(o) == jax.tree.structure(tree)
    assert float(s.threshold) == 0.0 and float(s.clipped_norm) == 0.0


def test_dtypes_kept_and_norm_in_float32():
  grads = {"a": jnp.full((4,), 300.0, jnp.float16),
           "b": jnp.full((3,), 0.25, jnp.bfloat16)}
  tx = optax_zclip.autoclip()
  out, state = jax.jit(tx.update)(grads, tx.init(grads))
  np.testing.assert_allclose(state.grad_norm, np.sqrt(4 * 9e4 + 3 / 16),
                             rtol=1e-6)
  assert {k: v.dtype for k, v in out.items()} == {
      k: v.dtype for k, v in grads.items()}


def test_inject_hyperparams_with_static_window_and_no_host_transfer():
  tx = optax.inject_hyperparams(optax_zclip.autoclip, static_args=("window",))(
      percentile=10.0, window=6)
  state = tx.init(SEQ[0])
  state.hyperparams["percentile"] = jnp.asarray(60.0)
  ref = AutoClipRef(percentile=60.0, window=6)
  outs, _ = run_without_host_transfer(tx.update, state, SEQ)
  for grads, out in zip(SEQ, outs, strict=True):
    scale, _ = ref.step(tree_norm64(grads.values()))
    np.testing.assert_allclose(tree_norm64(out.values()),
                               tree_norm64(grads.values()) * scale, rtol=1e-5)


def test_axis_name_plumbing():
  tx = optax_zclip.autoclip(percentile=50.0, window=4, axis_name="d")
  step = jax.jit(jax.vmap(tx.update, in_axes=(0, None), axis_name="d"))
  ref = AutoClipRef(percentile=50.0, window=4)
  state = tx.init(None)
  for g in [3.0, 1.0, 5.0, 2.0, 9.0]:
    halves = jnp.array([[g * 0.6], [g * 0.8]])  # norm of the pair: g
    out, states = step(halves, state)
    state = jax.tree.map(lambda x: x[0], states)
    scale, _ = ref.step(g)
    np.testing.assert_allclose(out, halves * scale, rtol=1e-5)


# Its rows of the one table of bad values (bad_values.py).
@pytest.mark.parametrize("fn,arg,value", bad_values.cases("autoclip"))
def test_bad_hyperparameter_raises_naming_it(fn, arg, value):
  bad_values.assert_refused(fn, arg, value)
