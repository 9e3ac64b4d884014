"""`adagc` step by step against `AdaGCRef`, the authors' rule in float64.

Every test feeds the same gradients to the jitted transform and to the
reference and compares, at every step, each tensor's factor (through the
outputs), each ``gamma_i``, ``num_clipped``, ``count``, ``nonfinite_count``
and both global norms. The sequences cover the warm-up, spikes confined to
one tensor, tensors whose norm is near ``eps`` (where feeding the EMA
``h_i * n_i`` instead of ``min(n_i, lambda_rel * gamma_i)`` drags ``gamma_i``
down), bfloat16 and float16 leaves, and NaN/Inf steps during and after the
warm-up.
"""

import inspect
import math

import bad_values
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references import (
  AdaGCRef,
  leaf_norm64,
  make_sequence,
  run_without_host_transfer,
  tree_norm64,
)

import optax_zclip

# Spikes confined to one tensor, on top of make_sequence's global spikes.
LEAF_SPIKES = {(14, "w1"): 20.0, (40, "b1"): 50.0, (41, "b1"): 8.0,
               (60, "w2"): 0.05, (75, "w2"): 12.0}

# Relative tolerance of an output element, by dtype: float32 rounding of the
# factor and the product, and the rounding of the output to its dtype.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(jnp.bfloat16): 8e-3,
        np.dtype(np.float16): 1e-3}
# And the absolute one: float16's spacing below its smallest normal number.
ATOL = {np.dtype(np.float16): 2.0**-24}


def leaf_spiky_sequence(steps=110, seed=1):
  seq = make_sequence(steps=steps, seed=seed)
  for (t, k), f in LEAF_SPIKES.items():
    if t < steps:
      seq[t][k] = seq[t][k] * np.float32(f)
  return seq


def tiny_sequence(steps=80, seed=2):
  """One ordinary tensor and two whose norms are a few ``eps`` (1e-6).

  Each tensor's norm has its own log-normal noise (so the tight default
  ``lambda_rel`` clips often) and ``tiny`` spikes 30-fold at three steps.
  """
  rng = np.random.default_rng(seed)
  sizes = {"big": ((6, 4), 1.0), "small": ((4,), 3e-5), "tiny": ((3,), 2e-6)}
  seq = []
  for t in range(steps):
    tree = {}
    for k, (shape, norm) in sizes.items():
      x = rng.standard_normal(shape)
      target = norm * math.exp(0.3 * rng.standard_normal())
      if k == "tiny" and t in (20, 45, 46):
        target *= 30.0
      tree[k] = (x * target / leaf_norm64(x)).astype(np.float32)
    seq.append(tree)
  return seq


def mixed_dtype_sequence():
  """`leaf_spiky_sequence` with ``b1`` in bfloat16 and ``w2`` in float16."""
  cast = {"w1": np.float32, "b1": jnp.bfloat16, "w2": np.float16}
  return [{k: v.astype(cast[k]) for k, v in g.items()}
          for g in leaf_spiky_sequence()]


def nonfinite_sequence():
  """`leaf_spiky_sequence` (warm-up 10) with NaN and Inf at some steps.

  Steps 3 and 4 (in warm-up) and 20, 21 and 60 (after it) hold a NaN or an
  Inf element in one tensor.
  """
  seq = leaf_spiky_sequence()
  for t, k, bad in [(3, "b1", np.nan), (4, "w2", np.inf), (20, "w1", np.nan),
                    (21, "b1", -np.inf), (60, "w2", np.nan)]:
    seq[t][k] = seq[t][k].copy()
    seq[t][k].flat[1] = bad
  return seq


SEQ = leaf_spiky_sequence()


def run_against_reference(seq, cfg, *, tx=None, state=None):
  """Runs ``adagc(**cfg)`` and ``AdaGCRef(**cfg)`` over ``seq``, comparing.

  Returns the reference (its state after the run), the final state and the
  number of tensors the reference clipped after the warm-up.
  """
  tx = tx or optax_zclip.adagc(**cfg)
  ref = AdaGCRef(**cfg)
  step = jax.jit(tx.update)
  state = state if state is not None else tx.init(seq[0])
  keys = sorted(seq[0])  # jax flattens dicts in sorted key order
  clipped_after_warmup = 0
  for t, grads in enumerate(seq):
    out, state = step(grads, state)
    leaves64 = [np.asarray(grads[k], np.float64) for k in keys]
    warm = ref.steps < ref.warmup_steps
    scales = ref.step(leaves64)
    for i, k in enumerate(keys):
      x = np.asarray(grads[k])
      want = leaves64[i] * scales[i]
      if np.all(np.isfinite(x)):
        np.testing.assert_allclose(np.asarray(out[k], np.float64), want,
                                   rtol=RTOL[x.dtype],
                                   atol=ATOL.get(x.dtype, 1e-30),
                                   err_msg=f"step {t} leaf {k}")
      else:  # passed through untouched
        np.testing.assert_array_equal(np.asarray(out[k]), x)
      assert out[k].dtype == x.dtype
      np.testing.assert_allclose(float(state.gamma[k]), ref.gamma[i],
                                 rtol=1e-5, err_msg=f"step {t} gamma {k}")
      assert state.gamma[k].dtype == jnp.float32
    assert int(state.num_clipped) == sum(ref.clipped), t
    assert int(state.capped) == ref.capped, t
    assert int(state.cap_count) == ref.cap_count, t
    assert int(state.count) == ref.steps, t
    assert int(state.nonfinite_count) == ref.nonfinite, t
    np.testing.assert_allclose(float(state.grad_norm), tree_norm64(leaves64),
                               rtol=1e-5, err_msg=t)
    np.testing.assert_allclose(
        float(state.clipped_norm),
        math.sqrt(sum((leaf_norm64(x) * s) ** 2
                      for x, s in zip(leaves64, scales, strict=True))),
        rtol=1e-5, err_msg=t)
    if not warm:
      clipped_after_warmup += sum(ref.clipped)
  return ref, state, clipped_after_warmup


CONFIGS = [
    dict(),  # the released defaults: warm-up 100 of the 110 steps
    dict(warmup_steps=10),
    dict(warmup_steps=10, max_grad_norm=None),
    dict(warmup_steps=1, lambda_rel=1.5, beta=0.9, max_grad_norm=2.2),
    dict(warmup_steps=25, lambda_rel=1.2, beta=0.98, eps=0.0),
    dict(warmup_steps=5, lambda_rel=0.8),  # below 1: first sights clipped
]


def _id(cfg):
  return ",".join(f"{k}={v}" for k, v in cfg.items()) or "defaults"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_matches_reference_every_leaf_every_step(cfg):
  ref, _, clipped = run_against_reference(SEQ, cfg)
  if ref.warmup_steps < 100:
    assert clipped >= 5  # the per-tensor rule was exercised


@pytest.mark.parametrize("cfg", [dict(warmup_steps=10),
                                 dict(warmup_steps=10, eps=1e-7)], ids=_id)
def test_matches_reference_on_tensors_near_eps(cfg):
  ref, state, clipped = run_against_reference(tiny_sequence(), cfg)
  assert clipped >= 30
  # The tiny tensor's norm is about 2 eps; feeding its EMA h * n instead of
  # the clipped norm would leave its gamma far below the reference's.
  np.testing.assert_allclose(float(state.gamma["tiny"]), ref.gamma[2],
                             rtol=1e-5)


@pytest.mark.parametrize("cfg", [dict(), dict(warmup_steps=10)], ids=_id)
def test_matches_reference_with_bfloat16_and_float16_leaves(cfg):
  _, state, clipped = run_against_reference(mixed_dtype_sequence(), cfg)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(state.gamma))
  if "warmup_steps" in cfg:
    assert clipped >= 5


@pytest.mark.parametrize("cfg", [dict(warmup_steps=10),
                                 dict(warmup_steps=10, max_grad_norm=None)],
                         ids=_id)
def test_matches_reference_through_nan_and_inf_steps(cfg):
  ref, state, clipped = run_against_reference(nonfinite_sequence(), cfg)
  assert ref.nonfinite == int(state.nonfinite_count) == 5
  assert ref.steps == int(state.count) == len(SEQ) - 5
  assert clipped >= 5


def test_defaults_are_the_released_codes():
  # clip_ratio=1.04, beta=0.99, eps=1e-6, start_clip_steps=100 in the
  # authors' Megatron-LM patch, with --clip-grad 1.0 in their scripts.
  params = inspect.signature(optax_zclip.adagc).parameters
  assert {k: params[k].default for k in
          ("lambda_rel", "beta", "warmup_steps", "max_grad_norm", "eps")} == (
              dict(lambda_rel=1.04, beta=0.99, warmup_steps=100,
                   max_grad_norm=1.0, eps=1e-6))


def test_a_spike_in_one_tensor_leaves_the_others_alone():
  tx = optax_zclip.adagc(warmup_steps=10)
  ref = AdaGCRef(warmup_steps=10)
  keys = sorted(SEQ[0])
  state = tx.init(SEQ[0])
  for grads in SEQ[:40]:
    _, state = tx.update(grads, state)
    ref.step([grads[k] for k in keys])
  grads = SEQ[40]  # b1 x50; its share of the global norm is small
  out, state = tx.update(grads, state)
  want = dict(zip(keys, ref.step([grads[k] for k in keys]), strict=True))
  ratio = {k: leaf_norm64(out[k]) / leaf_norm64(grads[k]) for k in grads}
  for k in keys:
    np.testing.assert_allclose(ratio[k], want[k], rtol=1e-5, err_msg=k)
  # Ordinary noise may trim a tensor (lambda_rel = 1.04 is tight); the
  # spiking tensor is cut to about its usual size.
  assert ratio["w1"] > 0.75 and ratio["w2"] > 0.75, ratio
  assert ratio["b1"] < 0.05, ratio


def test_hand_worked_sequence():
  # warmup_steps=2, cap 1: G = 5 -> f = 1 / (5 + eps); leaf norms 3 and 4
  # give gamma = (3f, 4f). Step 2, G = 0.5 (no clip): gamma = min(.) =
  # (0.3, 0.4). Step 3 (after warm-up), norms (0.3, 4.0): a passes (0.3 <=
  # 1.04 * 0.3); b is scaled by 1.04 * 0.4 / (4 + eps) and its EMA takes
  # 1.04 * 0.4.
  eps = 1e-6
  tx = optax_zclip.adagc(warmup_steps=2, max_grad_norm=1.0, eps=eps)
  state = tx.init({"a": jnp.zeros(1), "b": jnp.zeros(1)})
  f = 1 / (5 + eps)
  out, state = tx.update({"a": jnp.array([3.0]), "b": jnp.array([4.0])},
                         state)
  np.testing.assert_allclose([out["a"][0], out["b"][0]], [3 * f, 4 * f],
                             rtol=1e-6)
  assert int(state.num_clipped) == 2
  _, state = tx.update({"a": jnp.array([0.3]), "b": jnp.array([0.4])}, state)
  np.testing.assert_allclose([state.gamma["a"], state.gamma["b"]],
                             [0.3, 0.4], rtol=1e-6)
  assert int(state.num_clipped) == 0
  out, state = tx.update({"a": jnp.array([0.3]), "b": jnp.array([4.0])},
                         state)
  np.testing.assert_allclose(out["b"], [4 * 1.04 * 0.4 / (4 + eps)],
                             rtol=1e-6)
  np.testing.assert_allclose(out["a"], [0.3], rtol=1e-6)
  np.testing.assert_allclose(state.gamma["b"], 0.99 * 0.4 + 0.01 * 1.04 * 0.4,
                             rtol=1e-6)
  np.testing.assert_allclose(state.gamma["a"], 0.3, rtol=1e-6)
  assert int(state.num_clipped) == 1


def test_a_tensor_near_eps_is_clipped_only_above_its_limit():
  # gamma = 1e-6 = eps. A norm of 1.03e-6 is within the limit 1.04e-6 and
  # passes bit-identical (min(1, limit / (n + eps)) would halve it). A norm
  # of 3e-6 is scaled by 1.04e-6 / 4e-6, and its EMA takes 1.04e-6 (h * n
  # would be 0.78e-6).
  eps = 1e-6
  tx = optax_zclip.adagc(warmup_steps=1, max_grad_norm=None, eps=eps)
  state = tx.init({"t": jnp.zeros(1)})
  _, state = tx.update({"t": jnp.array([1e-6])}, state)
  np.testing.assert_allclose(state.gamma["t"], 1e-6, rtol=1e-6)
  x = jnp.array([1.03e-6])
  out, state = tx.update({"t": x}, state)
  np.testing.assert_array_equal(np.asarray(out["t"]).view(np.uint32),
                                np.asarray(x).view(np.uint32))
  assert int(state.num_clipped) == 0
  gamma = 0.99 * 1e-6 + 0.01 * 1.03e-6
  np.testing.assert_allclose(state.gamma["t"], gamma, rtol=1e-6)
  out, state = tx.update({"t": jnp.array([3e-6])}, state)
  np.testing.assert_allclose(out["t"], [3e-6 * 1.04 * gamma / (3e-6 + eps)],
                             rtol=1e-6)
  np.testing.assert_allclose(state.gamma["t"],
                             0.99 * gamma + 0.01 * 1.04 * gamma, rtol=1e-6)
  assert int(state.num_clipped) == 1


@pytest.mark.parametrize("lam", [1.04, 0.8])
def test_a_tensor_first_seen_after_warm_up_starts_from_its_own_norm(lam):
  # "late" is zero through the warm-up, so it has no gamma; its first norm
  # (5) becomes gamma and the rule applies at once: with lambda_rel >= 1 it
  # passes, with 0.8 it is scaled by 4 / (5 + eps) and its EMA takes 4.
  eps = 1e-6
  cfg = dict(warmup_steps=2, max_grad_norm=None, lambda_rel=lam, eps=eps)
  tx = optax_zclip.adagc(**cfg)
  ref = AdaGCRef(**cfg)
  state = tx.init({"a": jnp.zeros(1), "late": jnp.zeros(2)})
  feed = [[0.0, 0.0]] * 2 + [[3.0, 4.0]]
  for late in feed:
    grads = {"a": np.ones(1, np.float32), "late": np.array(late, np.float32)}
    out, state = tx.update(grads, state)
    scales = ref.step([np.ones(1), np.array(late)])
    assert int(state.num_clipped) == sum(ref.clipped)
  limit = min(5.0, lam * 5.0)
  h = limit / (5 + eps) if lam < 1 else 1.0
  np.testing.assert_allclose(out["late"], [3 * h, 4 * h], rtol=1e-6)
  np.testing.assert_allclose(out["late"], np.array([3.0, 4.0]) * scales[1],
                             rtol=1e-6)
  np.testing.assert_allclose(float(state.gamma["late"]),
                             0.99 * 5 + 0.01 * limit, rtol=1e-6)
  np.testing.assert_allclose(float(state.gamma["late"]), ref.gamma[1],
                             rtol=1e-6)


def test_a_nan_step_in_warm_up_does_not_use_up_a_warm_up_step():
  # warmup_steps=3; calls A, NaN, B, C, D. C is the third finite step, so
  # still warm-up: one global factor 1 / (G_C + eps) for both tensors, and
  # gamma the running minimum (counting the NaN step, C would have been
  # clipped per tensor instead: 3 -> 0.52). D is the first step of the
  # per-tensor rule.
  eps = 1e-6
  tx = optax_zclip.adagc(warmup_steps=3, max_grad_norm=1.0, eps=eps)
  ref = AdaGCRef(warmup_steps=3, max_grad_norm=1.0, eps=eps)
  step = jax.jit(tx.update)
  state = tx.init({"a": jnp.zeros(2), "b": jnp.zeros(2)})
  feed = [([0.3, 0.4], [0.0, 0.5]), ([np.nan, 1.0], [0.0, 0.5]),
          ([0.6, 0.0], [0.0, 0.7]), ([3.0, 0.0], [0.0, 4.0]),
          ([0.6, 0.0], [0.0, 4.0])]
  outs, states = [], []
  for t, (a, b) in enumerate(feed):
    grads = {"a": np.array(a, np.float32), "b": np.array(b, np.float32)}
    before = state
    out, state = step(grads, state)
    scales = ref.step([np.asarray(grads["a"], np.float64),
                       np.asarray(grads["b"], np.float64)])
    outs.append(out)
    states.append(state)
    assert int(state.count) == ref.steps == [1, 1, 2, 3, 4][t]
    assert int(state.nonfinite_count) == ref.nonfinite == int(t >= 1)
    assert int(state.num_clipped) == sum(ref.clipped)
    np.testing.assert_allclose([state.gamma["a"], state.gamma["b"]],
                               ref.gamma, rtol=1e-6)
    for k, s in zip("ab", scales, strict=True):
      if np.all(np.isfinite(grads[k])):
        np.testing.assert_allclose(out[k], grads[k] * s, rtol=1e-6)
    if t == 1:  # the NaN step: passes through, changes no gamma
      np.testing.assert_array_equal(out["a"], grads["a"])
      np.testing.assert_array_equal(out["b"], grads["b"])
      for k in "ab":
        assert float(state.gamma[k]) == float(before.gamma[k])
  # C: G = 5, factor 1 / (5 + eps); gamma = min(0.5, 3 / (5 + eps)) for a,
  # min(0.5, 0.7, 4 / (5 + eps)) for b.
  f = 1 / (5 + eps)
  np.testing.assert_allclose(outs[3]["a"], [3 * f, 0.0], rtol=1e-6)
  np.testing.assert_allclose(outs[3]["b"], [0.0, 4 * f], rtol=1e-6)
  assert int(states[3].num_clipped) == 2
  np.testing.assert_allclose([states[3].gamma["a"], states[3].gamma["b"]],
                             [0.5, 0.5], rtol=1e-6)
  # D: 0.6 and 4 both exceed 1.04 * 0.5 = 0.52.
  np.testing.assert_allclose(outs[4]["a"][0], 0.52 / (0.6 + eps) * 0.6,
                             rtol=1e-6)
  np.testing.assert_allclose(outs[4]["b"][1], 0.52 / (4 + eps) * 4,
                             rtol=1e-6)
  np.testing.assert_allclose([states[4].gamma["a"], states[4].gamma["b"]],
                             [0.99 * 0.5 + 0.01 * 0.52] * 2, rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("at", [5, 30])  # in warm-up, after it
def test_a_nonfinite_step_changes_no_gamma_and_no_count(bad, at):
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
  for k in keys:
    np.testing.assert_array_equal(np.asarray(new.gamma[k]).view(np.uint32),
                                  np.asarray(state.gamma[k]).view(np.uint32))
  np.testing.assert_array_equal(out["b1"], poisoned["b1"])  # untouched
  for k, s in zip(keys, scales, strict=True):
    if k != "b1":
      np.testing.assert_allclose(out[k], poisoned[k] * s, rtol=1e-5)
  assert int(new.count) == int(state.count) == ref.steps == at
  assert int(new.nonfinite_count) == ref.nonfinite == 1
  assert int(new.num_clipped) == sum(ref.clipped)
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
      warmup_steps=100, lambda_rel=1.04)
  state = tx.init(SEQ[0])
  state.hyperparams["warmup_steps"] = jnp.asarray(10)
  state.hyperparams["lambda_rel"] = jnp.asarray(1.2)
  ref = AdaGCRef(warmup_steps=10, lambda_rel=1.2)
  keys = sorted(SEQ[0])
  outs, _ = run_without_host_transfer(tx.update, state, SEQ)
  for grads, out in zip(SEQ, outs, strict=True):
    scales = ref.step([grads[k] for k in keys])
    for k, s in zip(keys, scales, strict=True):
      np.testing.assert_allclose(out[k], grads[k] * s, rtol=1e-5, atol=1e-30)


def test_axis_name_sums_each_tensor_across_the_axis():
  # Each tensor split in two halves along the vmapped axis "d"; the psum-ed
  # norms must give the reference's factors for the whole tensors.
  cfg = dict(warmup_steps=10)
  split = optax_zclip.adagc(**cfg, axis_name="d")
  ref = AdaGCRef(**cfg)
  step = jax.jit(jax.vmap(split.update, in_axes=(0, None), axis_name="d"))
  state = split.init(SEQ[0])
  keys = sorted(SEQ[0])
  clipped = 0
  for t, grads in enumerate(SEQ[:50]):
    grads = {k: v[:2] for k, v in grads.items()}
    halves = {k: jnp.stack([v[:1], v[1:]]) for k, v in grads.items()}
    out, pair = step(halves, state)
    state = jax.tree.map(lambda x: x[0], pair)
    scales = ref.step([grads[k] for k in keys])
    for i, k in enumerate(keys):
      np.testing.assert_allclose(out[k].reshape(grads[k].shape),
                                 grads[k] * scales[i], rtol=1e-5, atol=1e-30,
                                 err_msg=f"step {t} leaf {k}")
      np.testing.assert_allclose(float(state.gamma[k]), ref.gamma[i],
                                 rtol=1e-5, err_msg=f"step {t} gamma {k}")
    assert int(state.num_clipped) == sum(ref.clipped), t
    clipped += t >= 10 and any(ref.clipped)
  assert clipped >= 5  # the per-tensor rule ran on psum-ed norms


# Its rows of the one table of bad values (bad_values.py).
@pytest.mark.parametrize("fn,arg,value", bad_values.cases("adagc"))
def test_bad_hyperparameter_raises_naming_it(fn, arg, value):
  bad_values.assert_refused(fn, arg, value)
