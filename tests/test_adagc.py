"""`adagc` tensor by tensor against the float64 reference of SPEC.md."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_zclip
from references import (AdaGCRef, leaf_norm64, make_sequence,
                        run_without_host_transfer, tree_norm64)

# Spikes confined to one tensor, on top of make_sequence's global spikes.
LEAF_SPIKES = {(14, "w1"): 20.0, (40, "b1"): 50.0, (41, "b1"): 8.0,
               (60, "w2"): 0.05, (75, "w2"): 12.0}


def leaf_spiky_sequence(steps=110, seed=1):
  seq = make_sequence(steps=steps, seed=seed)
  for (t, k), f in LEAF_SPIKES.items():
    if t < steps:
      seq[t][k] = seq[t][k] * np.float32(f)
  return seq


SEQ = leaf_spiky_sequence()
CONFIGS = [
    dict(),  # the paper's defaults: warm-up 100 of the 110 steps
    dict(warmup_steps=10),
    dict(warmup_steps=10, max_grad_norm=None),
    dict(warmup_steps=1, lambda_rel=1.5, beta=0.9, max_grad_norm=2.2),
    dict(warmup_steps=25, lambda_rel=1.2, beta=0.99, eps=0.0),
]


def _id(cfg):
  return ",".join(f"{k}={v}" for k, v in cfg.items()) or "defaults"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_matches_reference_every_leaf_every_step(cfg):
  tx = optax_zclip.adagc(**cfg)
  ref = AdaGCRef(**cfg)
  step = jax.jit(tx.update)
  state = tx.init(SEQ[0])
  keys = sorted(SEQ[0])  # jax flattens dicts in sorted key order
  clipped_after_warmup = 0
  for t, grads in enumerate(SEQ):
    out, state = step(grads, state)
    scales = ref.step([grads[k] for k in keys])
    for k, s in zip(keys, scales):
      np.testing.assert_allclose(np.asarray(out[k], np.float64),
                                 grads[k] * s, rtol=1e-4, atol=1e-8,
                                 err_msg=f"step {t} leaf {k}")
      np.testing.assert_allclose(state.gamma[k], ref.gamma[keys.index(k)],
                                 rtol=1e-4, err_msg=f"step {t} gamma {k}")
      assert state.gamma[k].dtype == jnp.float32
    n_clipped = sum(s < 1 for s in scales)
    assert int(state.num_clipped) == n_clipped, t
    if t >= ref.warmup_steps:
      clipped_after_warmup += n_clipped
    np.testing.assert_allclose(state.grad_norm,
                               tree_norm64(grads.values()), rtol=1e-5)
    np.testing.assert_allclose(
        state.clipped_norm,
        math.sqrt(sum((leaf_norm64(grads[k]) * s) ** 2
                      for k, s in zip(keys, scales))), rtol=1e-4)
    assert int(state.count) == t + 1
  if ref.warmup_steps < 100:
    assert clipped_after_warmup >= 5  # the per-leaf rule was exercised


def test_a_spike_in_one_tensor_leaves_the_others_alone():
  tx = optax_zclip.adagc(warmup_steps=10)
  state = tx.init(SEQ[0])
  for grads in SEQ[:40]:
    _, state = tx.update(grads, state)
  grads = SEQ[40]  # b1 x50; its share of the global norm is small
  out, state = tx.update(grads, state)
  ratio = {k: leaf_norm64(out[k]) / leaf_norm64(grads[k]) for k in grads}
  # Ordinary noise may trim a small tensor (lambda_rel = 1.05 is tight);
  # the spiking tensor is cut to about its usual size.
  assert ratio["w1"] > 0.75 and ratio["w2"] > 0.75, ratio
  assert ratio["b1"] < 0.05, ratio


def test_hand_worked_sequence():
  # warmup_steps=2, cap 1: G = 5 -> f = 1 / (5 + eps); leaf norms 3 and 4
  # give gamma = (3f, 4f). Step 2, G = 0.5 (no clip): gamma = min(.) =
  # (0.3, 0.4). Step 3 (after warm-up), norms (0.3, 4.0): h = (1, 1.05 *
  # 0.4 / 4), gamma_b = 0.98 * 0.4 + 0.02 * h_b * 4.
  eps = 1e-6
  tx = optax_zclip.adagc(warmup_steps=2, max_grad_norm=1.0, eps=eps)
  state = tx.init({"a": jnp.zeros(1), "b": jnp.zeros(1)})
  f = 1 / (5 + eps)
  out, state = tx.update({"a": jnp.array([3.0]), "b": jnp.array([4.0])},
                         state)
  np.testing.assert_allclose([out["a"][0], out["b"][0]], [3 * f, 4 * f],
                             rtol=1e-6)
  _, state = tx.update({"a": jnp.array([0.3]), "b": jnp.array([0.4])}, state)
  np.testing.assert_allclose([state.gamma["a"], state.gamma["b"]],
                             [0.3, 0.4], rtol=1e-6)
  out, state = tx.update({"a": jnp.array([0.3]), "b": jnp.array([4.0])},
                         state)
  h_b = 1.05 * 0.4 / (4 + eps)
  np.testing.assert_allclose(out["b"], [4 * h_b], rtol=1e-6)
  np.testing.assert_allclose(out["a"], [0.3], rtol=1e-6)
  np.testing.assert_allclose(state.gamma["b"], 0.98 * 0.4 + 0.02 * h_b * 4,
                             rtol=1e-6)
  np.testing.assert_allclose(state.gamma["a"], 0.98 * 0.3 + 0.02 * 0.3,
                             rtol=1e-6)
  assert int(state.num_clipped) == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("at", [5, 30])  # in warm-up, after it
def test_nonfinite_tensor_keeps_its_gamma(bad, at):
  tx = optax_zclip.adagc(warmup_steps=10)
  ref = AdaGCRef(warmup_steps=10)
  keys = sorted(SEQ[0])
  step = jax.jit(tx.update)
  state = tx.init(SEQ[0])
  for grads in SEQ[:at]:
    _, state = step(grads, state)
    ref.step([grads[k] for k in keys])
  poisoned = dict(SEQ[at])
  poisoned["b1"] = poisoned["b1"].copy()
  poisoned["b1"][0] = bad
  out, new = step(poisoned, state)
  scales = ref.step([poisoned[k] for k in keys])
  np.testing.assert_array_equal(np.asarray(new.gamma["b1"]).view(np.uint32),
                                np.asarray(state.gamma["b1"]).view(np.uint32))
  np.testing.assert_array_equal(out["b1"], poisoned["b1"])  # untouched
  for k, s in zip(keys, scales):
    np.testing.assert_allclose(new.gamma[k], ref.gamma[keys.index(k)],
                               rtol=1e-4)
    if k != "b1":
      np.testing.assert_allclose(out[k], poisoned[k] * s, rtol=1e-4)
  assert int(new.nonfinite_count) == 1
  assert all(np.isfinite(float(v)) for v in jax.tree.leaves(new.gamma))


def test_zero_and_empty_and_none_leaves():
  tx = optax_zclip.adagc(warmup_steps=2, eps=0.0, max_grad_norm=None)
  tree = {"z": jnp.zeros(3), "x": jnp.ones(2), "m": None}
  state = tx.init(tree)
  assert state.gamma["m"] is None
  for _ in range(5):
    out, state = jax.jit(tx.update)(tree, state)
    assert out["m"] is None
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(out))
  assert float(state.gamma["z"]) == np.inf  # never observed, not 0 or NaN
  np.testing.assert_allclose(state.gamma["x"], np.sqrt(2), rtol=1e-6)
  # A zero tensor during warm-up does not pin its gamma to 0 for later.
  out, state = tx.update({"z": jnp.full(3, 2.0), "x": jnp.ones(2),
                          "m": None}, state)
  np.testing.assert_allclose(out["z"], jnp.full(3, 2.0))
  for tree in ({}, None):
    s = tx.init(tree)
    o, s = jax.jit(tx.update)(tree, s)
    assert o == tree and float(s.grad_norm) == 0.0


def test_dtypes_are_kept_and_statistics_are_float32():
  grads = {"a": jnp.full((4,), 300.0, jnp.float16),
           "b": jnp.full((3,), 0.25, jnp.bfloat16),
           "c": jnp.full((2,), 1.0, jnp.float32)}
  tx = optax_zclip.adagc(warmup_steps=1, max_grad_norm=1.0)
  state = tx.init(grads)
  out, state = jax.jit(tx.update)(grads, state)
  np.testing.assert_allclose(state.grad_norm,
                             math.sqrt(4 * 300.0**2 + 3 * 0.0625 + 2),
                             rtol=1e-6)
  for k in grads:
    assert out[k].dtype == grads[k].dtype
    assert state.gamma[k].dtype == jnp.float32
  np.testing.assert_allclose(state.gamma["a"], 600.0 / 600.0019, rtol=1e-4)


def test_jit_without_host_transfer_and_injected_hyperparams():
  tx = optax.inject_hyperparams(optax_zclip.adagc)(
      warmup_steps=100, lambda_rel=1.05)
  state = tx.init(SEQ[0])
  state.hyperparams["warmup_steps"] = jnp.asarray(10)
  state.hyperparams["lambda_rel"] = jnp.asarray(1.2)
  ref = AdaGCRef(warmup_steps=10, lambda_rel=1.2)
  keys = sorted(SEQ[0])
  outs, _ = run_without_host_transfer(tx.update, state, SEQ)
  for grads, out in zip(SEQ, outs):
    scales = ref.step([grads[k] for k in keys])
    for k, s in zip(keys, scales):
      np.testing.assert_allclose(out[k], grads[k] * s, rtol=1e-4, atol=1e-8)


def test_axis_name_sums_each_tensor_across_the_axis():
  cfg = dict(warmup_steps=10)
  whole, split = optax_zclip.adagc(**cfg), optax_zclip.adagc(
      **cfg, axis_name="d")
  step = jax.jit(jax.vmap(split.update, in_axes=(0, None), axis_name="d"))
  s_whole, s_split = whole.init(SEQ[0]), split.init(SEQ[0])
  for grads in SEQ[:50]:
    grads = {k: v[:2] for k, v in grads.items()}
    halves = {k: jnp.stack([v[:1], v[1:]]) for k, v in grads.items()}
    o_whole, s_whole = whole.update(grads, s_whole)
    o_split, s_pair = step(halves, s_split)
    s_split = jax.tree.map(lambda x: x[0], s_pair)
    for k in grads:
      np.testing.assert_allclose(o_split[k].reshape(grads[k].shape),
                                 o_whole[k], rtol=1e-5, atol=1e-8)
      np.testing.assert_allclose(s_split.gamma[k], s_whole.gamma[k],
                                 rtol=1e-5)
  assert int(s_whole.num_clipped) >= 0


BAD = [("lambda_rel", 0.0), ("lambda_rel", -1.0), ("lambda_rel", np.inf),
       ("beta", 0.0), ("beta", 1.0), ("beta", np.nan),
       ("warmup_steps", 0), ("warmup_steps", 2.5), ("warmup_steps", True),
       ("max_grad_norm", 0.0), ("max_grad_norm", -2.0),
       ("eps", -1.0), ("eps", np.inf)]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_bad_hyperparameter_raises_naming_it(name, value):
  with pytest.raises(ValueError, match=f"`{name}`"):
    optax_zclip.adagc(**{name: value})
