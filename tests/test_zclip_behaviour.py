"""zclip under jit, in chains, injected, in low precision, and on bad input."""

import math

import bad_values
import jax
import jax.numpy as jnp
import meshes
import numpy as np
import optax
import pytest
from references import (
  SEQ,
  ZClipRef,
  adamw64,
  run_without_host_transfer,
  tree_norm64,
)

import optax_zclip

ZCLIP_FIELDS = optax_zclip.ZClipState._fields


def _bits(x):
  return np.asarray(x).view(np.uint32)


# --------------------------------------------------------------------------
# jit, host transfers, composition


def test_jitted_step_makes_no_host_transfer():
  tx = optax_zclip.zclip(warmup_steps=3)
  grads = [g["w1"] for g in SEQ[:12]]
  # The first call compiles inside the guard too.
  outs, state = run_without_host_transfer(tx.update, tx.init(None), grads)
  assert int(state.count) == 12
  ref = ZClipRef(warmup_steps=3)
  for g, out in zip(grads, outs, strict=True):
    np.testing.assert_allclose(out, g * ref.step(tree_norm64([g]))["scale"],
                               rtol=1e-5)
  assert ref.spikes >= 1


def test_chained_before_adamw_matches_clip_then_adamw():
  cfg = dict(warmup_steps=5, max_grad_norm=None)
  lr = 1e-2
  tx = optax.chain(optax_zclip.zclip(**cfg), optax.adamw(lr, weight_decay=1e-4))
  params = {k: jnp.ones(v.shape) for k, v in SEQ[0].items()}
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  ref = ZClipRef(**cfg)
  clipped = []
  for grads in SEQ[:60]:
    params, state = train_step(params, state, grads)
    s = ref.step(tree_norm64(grads.values()))["scale"]
    clipped.append({k: np.asarray(v, np.float64) * s for k, v in grads.items()})
  assert ref.spikes >= 2
  expected = adamw64(clipped, {k: np.ones(v.shape) for k, v in SEQ[0].items()},
                      lr)
  for k in params:
    np.testing.assert_allclose(params[k], expected[k], rtol=2e-4, atol=2e-5)
  assert int(optax_zclip.stats(state)["zclip/spike_count"]) == ref.spikes


@pytest.mark.parametrize("warmup", [2, 9])
def test_inject_hyperparams_traces_warmup_steps(warmup):
  tx = optax.inject_hyperparams(optax_zclip.zclip)(
      warmup_steps=25, z_thresh=2.5, max_grad_norm=2.2)
  state = tx.init(SEQ[0])
  # Change the injected values after init: the jitted update must read them
  # from the state, not from the build-time defaults.
  state.hyperparams["warmup_steps"] = jnp.asarray(warmup)
  state.hyperparams["z_thresh"] = jnp.asarray(2.0)
  step = jax.jit(tx.update)
  ref = ZClipRef(warmup_steps=warmup, z_thresh=2.0, max_grad_norm=2.2)
  for grads in SEQ:
    out, state = step(grads, state)
    r = ref.step(tree_norm64(grads.values()))
    np.testing.assert_allclose(
        tree_norm64(out.values()) / tree_norm64(grads.values()), r["scale"],
        rtol=1e-4)
  zs = state.inner_state
  assert int(zs.spike_count) == ref.spikes
  np.testing.assert_allclose(zs.mean, ref.mean, rtol=1e-4)


# --------------------------------------------------------------------------
# dtypes


def test_norm_of_600_bf16_leaves_is_accumulated_in_float32():
  # 600 leaves (compile time grows with the leaf count; 3000 took minutes)
  # already tell the accumulations apart: summing the per-leaf sums in bf16
  # would be off by about 10%, far outside the tolerance below.
  rng = np.random.default_rng(1)
  leaves = [jnp.asarray(rng.uniform(0.5, 1.5, (256,)), jnp.bfloat16)
            for _ in range(600)]
  exact = tree_norm64([np.asarray(x, np.float64) for x in leaves])
  in_bf16 = jnp.zeros((), jnp.bfloat16)
  for x in leaves:
    in_bf16 += jnp.sum(jnp.square(x.astype(jnp.float32))).astype(jnp.bfloat16)
  assert abs(math.sqrt(float(in_bf16)) - exact) > 1e-2 * exact
  tx = optax_zclip.zclip(max_grad_norm=None)
  out, state = jax.jit(tx.update)(leaves, tx.init(leaves))
  np.testing.assert_allclose(float(state.grad_norm), exact, rtol=2e-6)
  assert all(o.dtype == jnp.bfloat16 for o in out)
  for f in ("mean", "var", "grad_norm", "clipped_norm", "z_score",
            "threshold"):
    assert getattr(state, f).dtype == jnp.float32, f


def test_f16_squares_do_not_overflow_and_dtypes_are_kept():
  grads = {"a": jnp.full((4,), 300.0, jnp.float16),  # 300**2 > f16 max
           "b": jnp.full((3,), 0.25, jnp.bfloat16),
           "c": jnp.full((2,), 1.0, jnp.float32)}
  tx = optax_zclip.zclip(max_grad_norm=1.0)
  out, state = jax.jit(tx.update)(grads, tx.init(grads))
  exact = math.sqrt(4 * 300.0**2 + 3 * 0.0625 + 2)
  np.testing.assert_allclose(float(state.grad_norm), exact, rtol=1e-6)
  scale = 1.0 / (exact + 1e-6)
  for k, x in grads.items():
    assert out[k].dtype == x.dtype
    np.testing.assert_allclose(np.asarray(out[k], np.float64),
                               np.asarray(x, np.float64) * scale, rtol=4e-3)
  np.testing.assert_allclose(float(state.clipped_norm), 1.0, rtol=1e-6)


def test_bf16_scale_is_applied_in_float32():
  # A scale rounded to bf16 (8 bits) would be off by up to 0.4%.
  x = jnp.full((8,), 3.0, jnp.bfloat16)
  tx = optax_zclip.zclip(max_grad_norm=0.3)
  out, _ = tx.update(x, tx.init(x))
  expected = 3.0 * 0.3 / (math.sqrt(8 * 9.0) + 1e-6)
  want = np.asarray(jnp.asarray(expected, jnp.bfloat16), np.float64)
  np.testing.assert_array_equal(np.asarray(out, np.float64), want)


# --------------------------------------------------------------------------
# non-finite, zero and empty input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("at", [2, 12])  # in warm-up, after warm-up
def test_nonfinite_gradients_leave_statistics_bit_identical(bad, at):
  tx = optax_zclip.zclip(warmup_steps=5)
  step = jax.jit(tx.update)
  state = tx.init(SEQ[0])
  for grads in SEQ[:at]:
    _, state = step(grads, state)
  poisoned = dict(SEQ[at])
  poisoned["b1"] = poisoned["b1"].copy()
  poisoned["b1"][1] = bad
  out, new = step(poisoned, state)
  for f in ("count", "mean", "var", "spike_count"):
    np.testing.assert_array_equal(_bits(getattr(new, f)),
                                  _bits(getattr(state, f)), err_msg=f)
  assert int(new.nonfinite_count) == int(state.nonfinite_count) + 1
  # Passed through untouched, for optax.apply_if_finite to see.
  for k in poisoned:
    np.testing.assert_array_equal(np.asarray(out[k]), poisoned[k])
  # And the run continues exactly as if the bad step had not happened.
  clean = state
  for grads in SEQ[at + 1: at + 20]:
    o1, new = step(grads, new)
    o2, clean = step(grads, clean)
    for k in grads:
      np.testing.assert_array_equal(np.asarray(o1[k]), np.asarray(o2[k]))
  assert int(new.nonfinite_count) == 1
  np.testing.assert_array_equal(_bits(new.mean), _bits(clean.mean))


def _all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_zero_gradients_produce_no_nan(eps, mode):
  tx = optax_zclip.zclip(warmup_steps=3, eps=eps, mode=mode)
  zeros = {"a": jnp.zeros((3, 2)), "b": jnp.zeros(())}
  state = tx.init(zeros)
  for _ in range(10):
    out, state = tx.update(zeros, state)
    assert _all_finite(out) and _all_finite(state._replace(threshold=0.0))
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(out))
  assert int(state.spike_count) == 0


def test_empty_pytree():
  tx = optax_zclip.zclip(warmup_steps=2)
  for tree in ({}, [], None, {"a": None}):
    state = tx.init(tree)
    for _ in range(4):
      out, state = jax.jit(tx.update)(tree, state)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    assert float(state.grad_norm) == 0.0 and float(state.mean) == 0.0
    assert int(state.count) == 4


@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_zero_variance_then_a_jump(eps):
  # Constant norms give var == 0 exactly; a larger norm is then an outlier
  # (z = 1 / eps, or infinite with eps = 0) and is clipped to the mean.
  tx = optax_zclip.zclip(warmup_steps=4, eps=eps, max_grad_norm=None)
  state = tx.init(None)
  for _ in range(8):
    _, state = tx.update(jnp.array([2.0]), state)
  assert float(state.var) == 0.0
  out, state = tx.update(jnp.array([3.0]), state)
  # adaptive_scaling with std = 0: c = mean + z_thresh**2 * 0 / z = mean.
  np.testing.assert_allclose(out, [3.0 * 2.0 / (3.0 + eps)], rtol=1e-6)
  assert int(state.spike_count) == 1
  assert not np.isnan(float(state.z_score)) and float(state.z_score) > 1e5
  assert _all_finite((state.mean, state.var, out))


# --------------------------------------------------------------------------
# axis_name plumbing (the cross-device tests are in the distributed suite)


def test_axis_name_sums_squares_across_the_named_axis():
  # Two "devices" under vmap, each holding half of every leaf: the norm, the
  # decisions and the state must be those of the whole gradient.
  cfg = dict(warmup_steps=5)
  whole = optax_zclip.zclip(**cfg)
  split = optax_zclip.zclip(**cfg, axis_name="d")

  def halves(t):
    return {k: jnp.stack([v[:1], v[1:2]]) for k, v in t.items()}

  step = jax.jit(jax.vmap(split.update, in_axes=(0, None), out_axes=(0, 0),
                          axis_name="d"))
  s_whole = whole.init(None)
  s_split = split.init(None)
  for grads in SEQ[:40]:
    grads = {k: v[:2] for k, v in grads.items()}  # leading dim 2 to split
    o_whole, s_whole = whole.update(grads, s_whole)
    o_split, s_pair = step(halves(grads), s_split)
    s_split = jax.tree.map(lambda x: x[0], s_pair)
    for k in grads:
      np.testing.assert_allclose(o_split[k].reshape(o_whole[k].shape),
                                 o_whole[k], rtol=1e-5)
    for f in ZCLIP_FIELDS:
      a = np.asarray(getattr(s_pair, f))
      assert a[0] == a[1], f  # every device reaches the same state
      np.testing.assert_allclose(a[0], getattr(s_whole, f), rtol=1e-4)
  assert int(s_whole.spike_count) >= 1


def test_axis_name_under_shard_map_on_one_device():
  mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
  tx = optax_zclip.zclip(warmup_steps=2, axis_name="data")
  P = jax.sharding.PartitionSpec
  step = jax.jit(meshes.shard_map(
      tx.update, mesh=mesh, in_specs=(P("data"), P()),
      out_specs=(P("data"), P())))
  state = tx.init(None)
  ref = ZClipRef(warmup_steps=2)
  for g in [0.5, 0.7, 0.6, 5.0]:
    out, state = step(jnp.array([g, 0.0]), state)
    np.testing.assert_allclose(out[0], g * ref.step(g)["scale"], rtol=1e-5)
  assert int(state.spike_count) == 1


# --------------------------------------------------------------------------
# validation


# Its rows of the one table of bad values (bad_values.py).
@pytest.mark.parametrize("fn,arg,value", bad_values.cases("zclip"))
def test_bad_hyperparameter_raises_naming_it(fn, arg, value):
  bad_values.assert_refused(fn, arg, value)


def test_good_edge_values_are_accepted():
  optax_zclip.zclip(alpha=0.999, eps=0.0, warmup_steps=np.int64(1),
                    max_grad_norm=None, mode="Percentile", clip_option="MAX",
                    z_thresh=np.float32(0.1), clip_factor=5.0)
