"""Gradients too large for a float32 sum of squares, but finite.

1e20 is finite in float32 and bfloat16, but its square is not: without care
the norm of such a gradient is Inf, the step counts as non-finite and passes
through unclipped, AdamW's second moment becomes Inf and the parameters stop
moving for good. The package recomputes such a norm after rescaling, so a
finite gradient has a finite norm and is clipped like any spike; only a NaN
or Inf element makes a step non-finite.

Every clipping transform of the registry (transforms.py) is held to its
float64 reference (references.py) on such steps, with float32, bfloat16 and
scalar leaves, and AdamW after a transform that clips must train as float64
AdamW on the reference's clipped gradients does.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references import ZClipRef, adamw64, make_sequence, tree_norm64
from transforms import CLIPPERS, TRANSFORMS

import optax_zclip
from optax_zclip import _numerics

F32_MAX = float(np.finfo(np.float32).max)
HUGE = 1e20
HUGE_AT = 12  # after every entry's warm-up
STEPS = HUGE_AT + 1 + 20  # 20 normal steps after the huge one
LR = 1e-2
SHAPES = {"w1": (7, 5), "b1": (5,), "w2": (3, 2, 4), "s": ()}
DTYPES = {"w1": np.float32, "b1": jnp.bfloat16, "w2": np.float32,
          "s": np.float32}
KEYS = sorted(SHAPES)  # jax's order of a dict's leaves
RTOL = {np.dtype(np.float32): 2e-5, np.dtype(jnp.bfloat16): 1e-2}


def _sequence(huge):
  """Gradient trees of norm about 1.5; at HUGE_AT, leaf ``huge`` (or every
  leaf, for "all") is multiplied by 1e20 (then rounded to its dtype)."""
  seq = []
  for t, tree in enumerate(make_sequence(steps=STEPS, seed=11,
                                         shapes=SHAPES)):
    if t == HUGE_AT:
      tree = {k: v * (HUGE if huge in (k, "all") else 1.0)
              for k, v in tree.items()}
    seq.append({k: jnp.asarray(v, DTYPES[k]) for k, v in tree.items()})
  return seq


def _bits(x):
  x = np.asarray(x)
  return x.view(f"u{x.dtype.itemsize}")


def _f64(tree):
  return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def _transform_and_reference(name):
  """The transform, and a function from float64 trees to per-leaf scales."""
  e = TRANSFORMS[name]
  ref = e.reference()
  return e.make(), lambda tree: dict(
      zip(KEYS, ref.step([tree[k] for k in KEYS]), strict=True))


@functools.cache
def _jitted(name):
  """The entry's jitted update and a jitted step of AdamW after it.

  Built once per entry, so that the cases of a transform share one compile
  (the transforms hold no Python state; the shapes are the same throughout).
  """
  tx = TRANSFORMS[name].make()
  chain = optax.chain(tx, optax.adamw(LR, weight_decay=1e-4))

  @jax.jit
  def train_step(params, state, grads):
    updates, state = chain.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(tx.update), chain, train_step


# The entries that bring a huge norm down (the others only measure it).
CLIPPING = [name for name in CLIPPERS if TRANSFORMS[name].clips]
assert all(TRANSFORMS[name].warmup < HUGE_AT for name in CLIPPERS)


@pytest.mark.parametrize("huge", ["w1", "b1", "s", "all"],
                         ids=["f32-leaf", "bf16-leaf", "scalar-leaf", "all"])
@pytest.mark.parametrize("name", CLIPPING)
def test_a_huge_finite_step_is_clipped_and_adamw_keeps_training(name, huge):
  tx, ref_scales = _transform_and_reference(name)
  step, chain, train_step = _jitted(name)
  params = {k: jnp.ones(s, jnp.float32) for k, s in SHAPES.items()}
  state = chain.init(params)

  clipped64 = []
  for t, grads in enumerate(_sequence(huge)):
    g64 = _f64(grads)
    scales = ref_scales(g64)
    clipped64.append({k: g64[k] * scales[k] for k in g64})
    if t == HUGE_AT:
      # The clipping alone, jitted and eagerly: the same.
      jitted = step(grads, state[0])[0]
      eager = tx.update(grads, state[0])[0]
      for k in grads:
        assert np.all(np.isfinite(np.asarray(jitted[k], np.float64))), k
        np.testing.assert_allclose(
            np.asarray(eager[k], np.float64),
            np.asarray(jitted[k], np.float64),
            rtol=RTOL[np.dtype(DTYPES[k])], err_msg=k)
    params, state = train_step(params, state, grads)
    clip_state = state[0]
    if t == HUGE_AT:
      # The norm is the float64 one; the step is finite and clipped.
      np.testing.assert_allclose(float(clip_state.grad_norm),
                                 tree_norm64(g64.values()), rtol=1e-5)
      assert int(clip_state.nonfinite_count) == 0
      # (Per tensor, only the huge leaves.)
      assert max(scales.values()) < 1e-18 or TRANSFORMS[name].per_tensor
      assert min(scales.values()) < 1e-18
      assert math.isfinite(float(clip_state.clipped_norm))
    # What went into AdamW has the reference's norm on every step.
    np.testing.assert_allclose(
        float(clip_state.clipped_norm),
        tree_norm64(clipped64[-1].values()), rtol=1e-4, err_msg=t)
    if t == HUGE_AT:
      at_huge = {k: np.asarray(v, np.float64) for k, v in params.items()}

  ones = {k: np.ones(s) for k, s in SHAPES.items()}
  want_at_huge = adamw64(clipped64[:HUGE_AT + 1], ones, LR)
  want = adamw64(clipped64, ones, LR)
  for k in SHAPES:
    atol = 3e-3 if DTYPES[k] == jnp.bfloat16 else 2e-4
    np.testing.assert_allclose(at_huge[k], want_at_huge[k], atol=atol,
                               err_msg=k)
    np.testing.assert_allclose(params[k], want[k], atol=atol, err_msg=k)
    # The 20 steps after the huge one moved the parameters as in float64.
    # (Frozen by an Inf second moment, weight decay alone would have moved
    # them by lr * 1e-4 per step: 2e-5 in 20 steps.)
    moved = np.asarray(params[k], np.float64) - at_huge[k]
    moved64 = want[k] - want_at_huge[k]
    np.testing.assert_allclose(moved, moved64, atol=2 * atol, err_msg=k)
    assert np.mean(np.abs(moved)) > 100 * 20 * LR * 1e-4, k


@pytest.mark.parametrize("name", CLIPPERS)
def test_outputs_are_the_reference_scales_on_every_step(name):
  tx, ref_scales = _transform_and_reference(name)
  step = _jitted(name)[0]
  seq = _sequence("all")
  state = tx.init(seq[0])
  for t, grads in enumerate(seq):
    out, state = step(grads, state)
    g64 = _f64(grads)
    scales = ref_scales(g64)
    for k in grads:
      x = np.asarray(out[k], np.float64)
      assert np.all(np.isfinite(x)), (t, k)
      np.testing.assert_allclose(x, g64[k] * scales[k],
                                 rtol=RTOL[np.dtype(DTYPES[k])], atol=1e-30,
                                 err_msg=f"step {t} leaf {k}")


@pytest.mark.parametrize("at", [2, HUGE_AT], ids=["warm-up", "after"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", CLIPPERS)
def test_a_nan_or_inf_element_next_to_huge_ones_is_still_nonfinite(
    name, bad, at):
  tx, ref_scales = _transform_and_reference(name)
  step = _jitted(name)[0]
  seq = _sequence("w1")
  state = tx.init(seq[0])
  for grads in seq[:at]:
    ref_scales(_f64(grads))
    _, state = step(grads, state)
  grads = dict(seq[HUGE_AT])  # "w1" is 1e20
  b1 = np.asarray(grads["b1"], np.float32)
  b1[2] = bad
  grads["b1"] = jnp.asarray(b1, jnp.bfloat16)
  out, new = step(grads, state)
  g = float(new.grad_norm)
  assert math.isnan(g) if np.isnan(bad) else g == math.inf
  assert int(new.nonfinite_count) == int(state.nonfinite_count) + 1
  scales = ref_scales(_f64(grads))
  for k in grads:
    np.testing.assert_allclose(
        np.asarray(out[k], np.float64),
        np.asarray(grads[k], np.float64) * scales[k], rtol=1e-2,
        err_msg=k)
  if not TRANSFORMS[name].per_tensor or at < TRANSFORMS[name].warmup:
    # Untouched, for optax.apply_if_finite to skip.
    for k in grads:
      np.testing.assert_array_equal(_bits(out[k]), _bits(grads[k]))
  else:
    # Per tensor: the huge tensor has a finite norm and is clipped; the bad
    # one passes through.
    assert scales["w1"] < 1e-18 and scales["b1"] == 1.0


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.complex64])
@pytest.mark.parametrize("shape", [(), (1,), (3,), (64, 33)])
@pytest.mark.parametrize("magnitude", [3e18, 1e20, 1e30, 1e37])
def test_norms_of_huge_leaves_are_the_float64_norms(magnitude, shape, dtype):
  rng = np.random.default_rng(int(math.log10(magnitude)) + len(shape))
  big = rng.standard_normal(shape) * magnitude
  if dtype == np.complex64:
    big = big + 1j * rng.standard_normal(shape) * magnitude
  tree = {"big": jnp.asarray(big, dtype), "small": jnp.ones(3),
          "zero": jnp.zeros((2, 2))}
  leaves64 = [np.abs(np.asarray(x).astype(np.complex128))
              for x in jax.tree.leaves(tree)]
  norms64 = [float(np.sqrt(np.sum(x**2))) for x in leaves64]
  total64 = math.sqrt(sum(n * n for n in norms64))
  # Beyond float32's range a norm is reported as its largest value.
  norms64 = [min(n, F32_MAX) for n in norms64]
  total64 = min(total64, F32_MAX)
  for run in (jax.jit, lambda f: f):
    np.testing.assert_allclose(
        float(run(_numerics.global_norm)(tree)), total64, rtol=1e-5)
    norms = run(_numerics.leaf_norms)(tree)
    np.testing.assert_allclose(np.asarray(norms, np.float64), norms64,
                               rtol=1e-5)
    np.testing.assert_allclose(float(run(_numerics.norm_of_norms)(norms)),
                               total64, rtol=1e-5)


@pytest.mark.parametrize("name", CLIPPING)
def test_a_norm_beyond_float32_is_float32_max_and_clipped(name):
  # Elements near float32's max: the norm (about 1e39) exceeds float32 and
  # is reported as its largest value, a finite step that is clipped; the
  # scale underflows to (nearly) 0, and nothing becomes NaN.
  grads = {"a": jnp.full((4,), 3e38, jnp.float32),
           "b": jnp.full((3,), -3e38, jnp.bfloat16), "c": jnp.ones(2)}
  assert float(_numerics.global_norm(grads)) == F32_MAX
  norms = _numerics.leaf_norms(grads)
  assert list(np.asarray(norms)[:2]) == [F32_MAX, F32_MAX]
  assert float(_numerics.norm_of_norms(norms)) == F32_MAX
  tx = TRANSFORMS[name].make()
  step = jax.jit(tx.update)
  state = tx.init(grads)
  normal = jax.tree.map(lambda x: x * 0 + 0.5, grads)
  # After the warm-up, and a few normal norms for a history to compare with.
  for grads_t in [normal] * (TRANSFORMS[name].warmup + 4) + [grads, normal]:
    out, state = step(grads_t, state)
    for x, x_in in zip(jax.tree.leaves(out), jax.tree.leaves(grads_t),
                       strict=True):
      x, x_in = np.asarray(x, np.float64), np.asarray(x_in, np.float64)
      assert np.all(np.isfinite(x)) and np.all(np.abs(x) <= np.abs(x_in))
    for x in jax.tree.leaves(state):
      assert not np.any(np.isnan(np.asarray(x))), state
    if grads_t is grads:
      assert float(state.grad_norm) == F32_MAX
      assert int(state.nonfinite_count) == 0
      assert float(state.clipped_norm) < 1e-30 * F32_MAX


# --------------------------------------------------------------------------
# ZClip: a huge norm during warm-up, when the statistics take raw norms


def test_a_huge_norm_in_warm_up_saturates_the_statistics_without_nan():
  # The warm-up statistics take the raw norm (as the reference code does):
  # its square overflows float32, so var saturates at float32's max instead
  # of becoming Inf (an Inf var made the next warm-up step's variance
  # Inf - Inf = NaN). max_grad_norm still caps every step.
  warmup, at = 10, 3
  tx = optax_zclip.zclip(warmup_steps=warmup, max_grad_norm=1.0)
  step = jax.jit(tx.update)
  seq = _sequence(huge=None)
  seq[at] = {k: v * HUGE for k, v in seq[at].items()}
  ref = ZClipRef(warmup_steps=warmup, max_grad_norm=1.0)
  state = tx.init(seq[0])
  for t, grads in enumerate(seq):
    out, state = step(grads, state)
    g64 = tree_norm64(_f64(grads).values())
    r = ref.step(g64)
    for f in ("mean", "var", "grad_norm", "clipped_norm", "z_score"):
      assert math.isfinite(float(getattr(state, f))), (t, f)
    assert int(state.nonfinite_count) == 0
    np.testing.assert_allclose(float(state.clipped_norm), g64 * r["scale"],
                               rtol=1e-2, err_msg=t)
    if at <= t < warmup:
      assert float(state.var) > 1e38  # saturated (float64: about 4e39)
      mean64, _ = ref.running_stats()
      np.testing.assert_allclose(float(state.mean), mean64, rtol=1e-5)
  assert float(ref.var) > F32_MAX  # what float32 could not hold
  assert float(state.var) > 1e37  # still decaying from float32's max


def test_after_a_huge_warm_up_norm_detection_comes_back():
  # The saturated variance decays by alpha per step; with alpha = 0.9 it
  # is back to the norms' own spread after about 900 steps, and from then
  # on the decisions are the float64 reference's (which held the variance
  # unsaturated), spikes included.
  warmup, at, steps, check_from = 10, 3, 1100, 1000
  spikes = (1030, 1070)
  cfg = dict(alpha=0.9, warmup_steps=warmup, max_grad_norm=None)
  tx = optax_zclip.zclip(**cfg)
  step = jax.jit(tx.update)
  seq = make_sequence(steps=steps, seed=4)
  seq[at] = {k: v * np.float32(HUGE) for k, v in seq[at].items()}
  for t in spikes:
    seq[t] = {k: v * np.float32(10.0) for k, v in seq[t].items()}
  ref = ZClipRef(**cfg)
  state = tx.init(seq[0])
  flags, flags64 = [], []
  for t, grads in enumerate(seq):
    before = int(state.spike_count)
    out, state = step(grads, state)
    r = ref.step(tree_norm64(grads.values()))
    for f in ("mean", "var", "z_score"):
      assert not math.isnan(float(getattr(state, f))), (t, f)
    if t >= check_from:
      for k in grads:
        np.testing.assert_allclose(out[k], grads[k] * r["scale"], rtol=1e-4,
                                   atol=1e-7, err_msg=f"step {t} {k}")
      flags.append(int(state.spike_count) > before)
      flags64.append(r["spike"])
  assert int(state.nonfinite_count) == 0  # the huge norm was taken in
  assert flags == flags64
  assert {t for t, f in enumerate(flags, start=check_from) if f} >= set(spikes)


@pytest.mark.parametrize("alpha", [0.5, 0.97])
def test_the_moving_averages_do_not_overflow_near_float32_max(alpha):
  # `a * v + (1 - a) * x` is folded by XLA into `(v + x) * 0.5` when
  # alpha = 0.5, which overflows for statistics near float32's max; the
  # update must give the float64 value instead.
  tx = optax_zclip.zclip(alpha=alpha, warmup_steps=1, max_grad_norm=None)
  step = jax.jit(tx.update)
  for mean, var, g in [(1e19, F32_MAX, 1.0), (3e38, 1e38, 3e38)]:
    state = tx.init(None)._replace(count=jnp.asarray(1, jnp.int32),
                                   mean=jnp.float32(mean),
                                   var=jnp.float32(var))
    _, new = step(jnp.array([g], jnp.float32), state)
    assert int(new.spike_count) == 0  # so the EMA takes g itself
    mean32, var32, g32 = (float(np.float32(v)) for v in (mean, var, g))
    mean64 = alpha * mean32 + (1 - alpha) * g32
    var64 = alpha * var32 + (1 - alpha) * (g32 - mean64) ** 2
    np.testing.assert_allclose(float(new.mean), mean64, rtol=1e-6)
    np.testing.assert_allclose(float(new.var), var64, rtol=1e-6)
