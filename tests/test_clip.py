"""`clip_by_global_norm`: the fixed threshold, against float64 and optax.

The updates and every telemetry field are checked step by step against a
float64 NumPy clip over a sequence with drift, spikes and NaN/Inf steps, in
float32 and bf16; on float32 gradients the updates must equal
`optax.clip_by_global_norm`'s.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references import SEQ, run_without_host_transfer, tree_norm64

import optax_zclip


def _clip64(grads, max_norm):
  """Float64 global-norm clip: (scale, norm)."""
  g = tree_norm64(grads.values())
  if max_norm is None or not math.isfinite(g) or g <= max_norm:
    return 1.0, g
  return max_norm / g, g


def _with_bad_steps(seq):
  seq = [dict(g) for g in seq]
  seq[20] = {k: np.full_like(v, np.nan) for k, v in seq[20].items()}
  first = next(iter(seq[40]))
  seq[40][first] = seq[40][first].copy()
  seq[40][first].flat[0] = np.inf
  return seq


@pytest.mark.parametrize("max_norm", [1.0, 2.5, None])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_a_float64_clip_step_by_step(max_norm, dtype):
  seq = [{k: jnp.asarray(v, dtype) for k, v in g.items()}
         for g in _with_bad_steps(SEQ)]
  tx = optax_zclip.clip_by_global_norm(max_norm)
  outs, _ = run_without_host_transfer(tx.update, tx.init(seq[0]), seq)
  state = tx.init(seq[0])
  step = jax.jit(tx.update)
  clipped = nonfinite = finite = 0
  for t, grads in enumerate(seq):
    out, state = step(grads, state)
    # The float64 clip sees the very values the transform received.
    g64 = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    scale, g = _clip64(g64, max_norm)
    finite += math.isfinite(g)
    nonfinite += not math.isfinite(g)
    clipped += scale < 1
    rtol = 1e-6 if dtype == jnp.float32 else 8e-3  # bf16 output rounding
    for k in grads:
      assert out[k].dtype == dtype
      np.testing.assert_allclose(np.asarray(out[k], np.float64),
                                 g64[k] * scale, rtol=rtol, atol=1e-30,
                                 err_msg=f"step {t} {k}")
      np.testing.assert_array_equal(np.asarray(outs[t][k], np.float64),
                                    np.asarray(out[k], np.float64))
    if math.isfinite(g):
      np.testing.assert_allclose(state.grad_norm, g, rtol=1e-6)
      np.testing.assert_allclose(state.clipped_norm, g * scale, rtol=1e-6)
    else:
      assert not np.isfinite(state.grad_norm)
    assert state.threshold == (np.inf if max_norm is None
                               else np.float32(max_norm))
    assert (int(state.count), int(state.clipped_count),
            int(state.nonfinite_count)) == (finite, clipped, nonfinite)
  assert nonfinite == 2
  assert (clipped > 10) == (max_norm is not None)


def test_equals_optax_clip_by_global_norm_on_float32():
  ours, theirs = (optax_zclip.clip_by_global_norm(1.5),
                  optax.clip_by_global_norm(1.5))
  s1, s2 = ours.init(SEQ[0]), theirs.init(SEQ[0])
  for grads in SEQ:
    a, s1 = jax.jit(ours.update)(grads, s1)
    b, s2 = jax.jit(theirs.update)(grads, s2)
    for k in grads:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_nan_passes_through_untouched_where_optax_gives_nan_everywhere():
  grads = {"a": jnp.array([np.nan, 1.0]), "b": jnp.array([3.0, 4.0])}
  out, state = optax_zclip.clip_by_global_norm(1.0).update(
      grads, optax_zclip.clip_by_global_norm(1.0).init(grads))
  np.testing.assert_array_equal(out["b"], [3.0, 4.0])
  assert int(state.nonfinite_count) == 1 and int(state.count) == 0
  # apply_if_finite then skips the step, as it should.
  tx = optax.apply_if_finite(
      optax.chain(optax_zclip.clip_by_global_norm(1.0), optax.sgd(1.0)), 5)
  updates, st = tx.update(grads, tx.init(grads))
  np.testing.assert_array_equal(updates["b"], [0.0, 0.0])
  assert int(st.notfinite_count) == 1


def test_none_measures_and_logs_without_clipping():
  tx = optax.chain(optax_zclip.clip_by_global_norm(None), optax.sgd(1.0))
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.array([30.0, 40.0])}, state, params)
  np.testing.assert_allclose(updates["w"], [-30.0, -40.0])
  s = optax_zclip.stats(state)
  assert float(s["clip/grad_norm"]) == 50.0 == float(s["clip/clipped_norm"])
  assert (float(s["clip/threshold"]) == np.inf
          and int(s["clip/clipped_count"]) == 0)


def test_low_precision_norm_is_accumulated_in_float32():
  # 300**2 overflows float16 (max 65504): a float16 sum of squares is inf,
  # which would pass the step through as non-finite.
  grads = {"w": jnp.full((16,), 300.0, jnp.float16)}
  tx = optax_zclip.clip_by_global_norm(0.5)
  out, state = tx.update(grads, tx.init(grads))
  assert float(state.grad_norm) == 1200.0
  assert int(state.nonfinite_count) == 0
  assert out["w"].dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(out["w"], np.float64), 0.125,
                             rtol=1e-3)
