"""`skip_spikes` against a float64 transcription of its rule.

Sequences of gradients and losses with loss outliers, norm outliers, both at
once, outliers before the test is active, NaN and Inf gradients and losses,
run through ``skip_spikes(chain(zclip(), adamw()))`` for windows of 4, 7 and
128 (long enough to wrap the ring buffer): every decision and threshold must
be the reference's (`references.SkipSpikesRef`, a deque of pairs), a skipped
step must return zeros and leave the inner state bit-identical, and the run
must equal the inner chain run on the kept steps only. Then the wrappers
(`optax.MultiSteps`, `optax.apply_if_finite`, `optax.inject_hyperparams`),
an Orbax restore in the middle of the window, the telemetry, the edge cases
and the compiled HLO (one reduction of the gradients for the norm, shared
with ZClip's). Flax NNX, with the loss passed to ``optimizer.update``, is in
``test_nnx.py``.
"""

from __future__ import annotations

import collections
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references import SHAPES, SkipSpikesRef, tree_norm64
from transforms import CLIPPERS, TRANSFORMS, WRAPPERS, with_adamw
from versions import measured_on

import optax_zclip
from optax_zclip import _shared_norms

LR = 1e-2
ZCLIP = dict(warmup_steps=5)


def _grads(rng, norm):
  tree = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
  n = tree_norm64(tree.values())
  return {k: (v * norm / n).astype(np.float32) for k, v in tree.items()}


def make_run(steps, seed, events):
  """``[(grads, loss)]``: a drifting norm and a decaying loss, plus events.

  ``events`` maps a step to what happens there: ``("norm", k)`` multiplies
  the norm by ``k``, ``("loss", d)`` adds ``d`` to the loss, ``("both", k,
  d)`` does both, ``("nan_grad",)``, ``("inf_grad",)``, ``("nan_loss",)``,
  ``("inf_loss",)`` and ``("no_loss",)`` speak for themselves.
  """
  rng = np.random.default_rng(seed)
  run = []
  for t in range(steps):
    norm = (1.0 + 0.2 * math.sin(t / 15)) * math.exp(0.05 *
                                                      rng.standard_normal())
    loss = 3.0 * math.exp(-t / 300) + 0.02 * rng.standard_normal()
    kind, *args = events.get(t, ("",))
    if kind in ("norm", "both"):
      norm *= args[0]
    if kind in ("loss", "both"):
      loss += args[-1]
    grads = _grads(rng, norm)
    if kind in ("nan_grad", "inf_grad"):
      grads["w2"][1, 0, 2] = np.nan if kind == "nan_grad" else np.inf
    loss = {"nan_loss": math.nan, "inf_loss": math.inf,
            "no_loss": None}.get(kind, loss)
    run.append((grads, loss))
  return run


# (window, sigma, steps, events). The small windows' tests start at 2 and 3
# recorded steps; the 128 one at 63, so its step-30 spike is taken.
RUNS = {
    4: (4, 3.0, 48, {
        10: ("norm", 30.0), 16: ("loss", 3.0), 21: ("nan_grad",),
        22: ("nan_loss",), 27: ("both", 20.0, 2.0), 33: ("inf_loss",),
        34: ("inf_grad",), 40: ("norm", 25.0), 41: ("loss", 4.0)}),
    7: (7, 3.0, 70, {
        2: ("norm", 40.0), 12: ("norm", 30.0), 20: ("loss", 3.0),
        28: ("nan_grad",), 29: ("nan_grad",), 36: ("nan_loss",),
        44: ("both", 20.0, 3.0), 52: ("inf_grad",), 60: ("loss", 5.0)}),
    128: (128, 6.0, 420, {
        30: ("norm", 40.0), 35: ("loss", 4.0), 90: ("norm", 30.0),
        150: ("loss", 3.0), 200: ("nan_grad",), 201: ("nan_loss",),
        260: ("both", 25.0, 3.0), 330: ("norm", 30.0), 380: ("inf_grad",),
        400: ("loss", 2.0)}),
}


def _skip_tx(window, sigma):
  return optax_zclip.skip_spikes(
      optax.chain(optax_zclip.zclip(**ZCLIP), optax.adamw(LR)),
      window=window, sigma=sigma)


def _params():
  return {k: jnp.linspace(-1.0, 1.0, int(np.prod(s)), dtype=jnp.float32)
          .reshape(s) for k, s in SHAPES.items()}


def _step(tx):
  @jax.jit
  def step(params, state, grads, loss):
    # value=None: a step without a loss, the norm test alone (asked for, so
    # without the warning an update that has no `value` at all gives).
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, updates

  return step


def _bits(x):
  a = np.atleast_1d(np.asarray(x))
  return a.view(f"u{a.dtype.itemsize}")


def _assert_bit_identical(a, b, msg=""):
  assert jax.tree.structure(a) == jax.tree.structure(b), msg
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(_bits(x), _bits(y), err_msg=msg)


def _run64(run):
  return [(tree_norm64(g.values()), loss) for g, loss in run]


@pytest.mark.parametrize("window", list(RUNS))
def test_decisions_and_thresholds_equal_the_float64_reference(window):
  window, sigma, steps, events = RUNS[window]
  run = make_run(steps, seed=window, events=events)
  tx = _skip_tx(window, sigma)
  step = _step(tx)
  params = _params()
  state = tx.init(params)
  ref = SkipSpikesRef(window=window, sigma=sigma)
  kinds = set()
  for t, ((grads, loss), (g64, _)) in enumerate(zip(run, _run64(run),
                                                    strict=True)):
    before = state.inner_state
    params, state, updates = step(params, state, grads, loss)
    want = ref.step(g64, loss)
    assert int(state.skipped) == want["skip"], t
    assert int(state.skip_count) == ref.skips, t
    assert int(state.nonfinite_count) == ref.nonfinite, t
    assert int(state.size) == len(ref.history), t
    for key in ("loss_threshold", "norm_threshold"):
      np.testing.assert_allclose(float(getattr(state, key)), want[key],
                                 rtol=1e-5, err_msg=f"{key} at {t}")
    if math.isfinite(g64):
      np.testing.assert_allclose(float(state.grad_norm), g64, rtol=1e-5)
    if want["skip"]:
      _assert_bit_identical(state.inner_state, before, f"step {t}")
      for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(u, np.zeros_like(u))
      kinds.add("nonfinite" if want["nonfinite"] else
                ("loss" if want["loss_out"] else "")
                + ("norm" if want["norm_out"] else ""))
    elif t in events:
      kinds.add("taken")  # an event the test was not yet active for
  # Every kind of skip happened, so the agreement above means something.
  assert {"nonfinite", "loss", "norm", "lossnorm"} <= kinds, kinds
  if window == 128:
    assert "taken" in kinds
  # The ring buffer holds the last `window` finite pairs, oldest overwritten.
  recorded = list(ref.history)
  pos = int(state.position)
  order = [(pos + i) % window for i in range(window)][-len(recorded):]
  np.testing.assert_allclose(np.asarray(state.norms)[order],
                             [g for _, g in recorded], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.losses)[order],
                             [x for x, _ in recorded], rtol=1e-6)
  assert len(recorded) == min(window, steps - ref.nonfinite)


@pytest.mark.parametrize("window", [4, 7])
def test_a_run_equals_the_inner_chain_on_the_kept_steps_only(window):
  window, sigma, steps, events = RUNS[window]
  run = make_run(steps, seed=window, events=events)
  tx = _skip_tx(window, sigma)
  step = _step(tx)
  params = _params()
  state = tx.init(params)
  kept = []
  for grads, loss in run:
    params, state, _ = step(params, state, grads, loss)
    if not int(state.skipped):
      kept.append(grads)
  assert len(kept) < len(run) - 5
  inner = optax.chain(optax_zclip.zclip(**ZCLIP), optax.adamw(LR))
  inner_step = _step(inner)
  p1 = _params()
  s1 = inner.init(p1)
  for grads in kept:
    p1, s1, _ = inner_step(p1, s1, grads, None)
  for k in params:
    np.testing.assert_allclose(params[k], p1[k], rtol=1e-6, atol=1e-6)
  assert int(s1[1][0].count) == len(kept)  # AdamW's count
  for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(s1),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_steps_without_a_loss_use_the_norm_test_and_record_the_norm():
  # A loss on some steps only: the loss test reads only the losses given.
  events = {t: ("no_loss",) for t in range(0, 60, 3)}
  events.update({4: ("no_loss",), 5: ("no_loss",), 25: ("loss", 3.0),
                 31: ("norm", 30.0), 40: ("loss", 4.0), 43: ("both", 20, 3)})
  run = make_run(60, seed=11, events=events)
  tx = _skip_tx(7, 3.0)
  step = _step(tx)
  params = _params()
  state = tx.init(params)
  ref = SkipSpikesRef(window=7, sigma=3.0)
  for t, (grads, loss) in enumerate(run):
    params, state, _ = step(params, state, grads, loss)
    want = ref.step(tree_norm64(grads.values()), loss)
    assert int(state.skipped) == want["skip"], t
    np.testing.assert_allclose(float(state.loss_threshold),
                               want["loss_threshold"], rtol=1e-5)
    np.testing.assert_allclose(float(state.norm_threshold),
                               want["norm_threshold"], rtol=1e-5)
    if loss is None:
      assert float(state.loss_threshold) == math.inf
  assert ref.skips >= 3
  held = [x is not None for x, _ in ref.history]
  pos = int(state.position)
  np.testing.assert_array_equal(
      np.asarray(state.has_loss)[[(pos + i) % 7 for i in range(7)]], held)


def test_without_any_loss_only_the_norm_decides():
  run = make_run(40, seed=5, events={20: ("loss", 9.0), 30: ("norm", 30.0)})
  tx = _skip_tx(7, 3.0)
  step = _step(tx)
  params = _params()
  state = tx.init(params)
  ref = SkipSpikesRef(window=7, sigma=3.0)
  skipped = []
  for t, (grads, _) in enumerate(run):
    params, state, _ = step(params, state, grads, None)
    assert int(state.skipped) == ref.step(tree_norm64(grads.values()))["skip"]
    skipped += [t] * int(state.skipped)
  assert 30 in skipped and 20 not in skipped  # the loss outlier went through
  assert not np.asarray(state.has_loss).any()
  assert not np.asarray(state.losses).any()  # zeros, never NaN


# --------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("bad", ["nan_grad", "inf_grad", "nan_loss",
                                 "inf_loss"])
@pytest.mark.parametrize("at", [1, 20])  # before the test is active, after
def test_a_non_finite_step_is_skipped_and_recorded_nowhere(bad, at):
  run = make_run(at + 1, seed=3, events={at: (bad,)})
  tx = _skip_tx(7, 3.0)
  step = _step(tx)
  params = _params()
  state = tx.init(params)
  for grads, loss in run[:-1]:
    params, state, _ = step(params, state, grads, loss)
  new_params, new_state, updates = step(params, state, *run[-1])
  _assert_bit_identical(new_params, params)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, np.zeros_like(u))  # zeros, not NaN
  _assert_bit_identical(
      (new_state.inner_state, new_state.losses, new_state.norms,
       new_state.has_loss, new_state.size, new_state.position),
      (state.inner_state, state.losses, state.norms, state.has_loss,
       state.size, state.position))
  assert int(new_state.skipped) == 1
  assert int(new_state.nonfinite_count) == 1
  assert int(new_state.skip_count) == int(state.skip_count) + 1


def test_a_constant_history_skips_any_larger_value_and_no_nan_appears():
  tx = optax_zclip.skip_spikes(optax.sgd(1.0), window=4, sigma=6.0)
  zero = {"w": jnp.zeros(3)}
  state = tx.init(zero)
  step = jax.jit(tx.update)
  for _ in range(4):  # zero gradients, a constant loss: std is 0
    out, state = step(zero, state, value=2.0)
    assert int(state.skipped) == 0
  assert float(state.norm_threshold) == 0.0
  assert float(state.loss_threshold) == 2.0
  _, equal = step(zero, state, value=2.0)
  assert int(equal.skipped) == 0
  _, above = step({"w": jnp.array([1e-3, 0.0, 0.0])}, state, value=2.0)
  assert int(above.skipped) == 1
  for leaf in jax.tree.leaves(above):
    assert not np.isnan(np.asarray(leaf, np.float64)).any()


def test_a_huge_finite_loss_in_the_window_does_not_overflow_the_statistics():
  tx = optax_zclip.skip_spikes(optax.sgd(1.0), window=6, sigma=2.0)
  grads = {"w": jnp.ones(2)}
  state = tx.init(grads)
  step = jax.jit(tx.update)
  ref = SkipSpikesRef(window=6, sigma=2.0)
  for t, loss in enumerate([3.0, 3.1, 2.9, 1e30, 3.0, 3.2, 2.8, 3.1, 3.0,
                            2.9, 9.0]):
    _, state = step(grads, state, value=loss)
    want = ref.step(math.sqrt(2.0), loss)
    assert int(state.skipped) == want["skip"], t
    np.testing.assert_allclose(float(state.loss_threshold),
                               want["loss_threshold"], rtol=1e-5)
  # 1e30 squared overflows float32; its window gave a finite threshold.
  assert ref.skips == 2  # 1e30 itself, and 9.0 once 1e30 has left


def test_the_loss_may_be_any_real_scalar_but_not_a_vector():
  tx = optax_zclip.skip_spikes(optax.sgd(1.0), window=2)
  grads = {"w": jnp.ones(2)}
  state = tx.init(grads)
  for value in (2.5, np.float64(2.5), jnp.bfloat16(2.5), jnp.asarray(2),
                np.array(2.5)):
    _, s = jax.jit(tx.update)(grads, state, value=value)
    np.testing.assert_array_equal(s.losses, [float(value), 0.0])
  with pytest.raises(ValueError, match="^`value` must be a scalar"):
    tx.update(grads, state, value=jnp.ones(2))


# --------------------------------------------------------------------------
# Inside Optax's wrappers.


@pytest.mark.parametrize("with_loss", [True, False])
def test_multisteps_decides_once_per_real_step_on_the_mean_gradient(
    with_loss):
  # MultiSteps hands each mini-step's extra args to the wrapped transform
  # and keeps its state only at the last one: passing there the mean of the
  # micro-batch losses (a running mean, as a train loop can keep) tests the
  # real step's loss against the real steps' losses.
  k, window, sigma = 3, 7, 3.0
  # (No NaN here: optax's MultiSteps resets its accumulator by multiplying
  # it by 0, so a NaN micro-batch would stay in it for good.)
  events = {30: ("norm", 30.0), 45: ("loss", 6.0), 75: ("both", 20.0, 4.0)}
  run = make_run(99, seed=8, events=events)
  tx = optax.MultiSteps(_skip_tx(window, sigma), every_k_schedule=k)
  step = _step(tx)
  params = _params()
  state = tx.init(params)
  ref = SkipSpikesRef(window=window, sigma=sigma)
  for i in range(0, len(run), k):
    micro = run[i:i + k]
    for j, (grads, _) in enumerate(micro):
      mean_loss = float(np.mean([x for _, x in micro[:j + 1]]))
      before = state.inner_opt_state
      params, state, _ = step(params, state, grads,
                              mean_loss if with_loss else None)
      if j < k - 1:
        _assert_bit_identical(state.inner_opt_state, before)
    mean = {key: np.mean([np.asarray(g[key], np.float64) for g, _ in micro],
                         axis=0) for key in SHAPES}
    want = ref.step(tree_norm64(mean.values()),
                    mean_loss if with_loss else None)
    s = state.inner_opt_state
    assert int(s.skipped) == want["skip"], i
    assert int(s.skip_count) == ref.skips, i
    assert int(s.size) == len(ref.history), i
  # One decision per real step, each kind of skip among them.
  assert int(state.gradient_step) == len(run) // k
  assert ref.skips >= (3 if with_loss else 2)


def _poison(grads):
  bad = {k: np.array(v) for k, v in grads.items()}
  bad["w2"][1, 0, 2] = np.nan
  return bad


def test_multisteps_drops_a_nan_micro_batch_with_skip_not_finite():
  # Without should_skip_update_fn, MultiSteps would keep the NaN in its
  # accumulator (0 * NaN at the reset) and every later step would be NaN.
  k = 3
  run = make_run(60, seed=8, events={30: ("norm", 30.0)})
  tx = optax.MultiSteps(_skip_tx(7, 3.0), every_k_schedule=k,
                        should_skip_update_fn=optax.skip_not_finite)
  step = _step(tx)
  params = _params()
  state = tx.init(params)
  ref = SkipSpikesRef(window=7, sigma=3.0)
  for i in range(0, len(run), k):
    micro = run[i:i + k]
    for j, (grads, _) in enumerate(micro):
      mean_loss = float(np.mean([x for _, x in micro[:j + 1]]))
      if i == 21 and j == 1:  # an extra, NaN micro-batch: dropped
        params, state, _ = step(params, state, _poison(grads),
                                      mean_loss)
        assert int(state.mini_step) == j
      params, state, _ = step(params, state, grads, mean_loss)
    mean = {key: np.mean([np.asarray(g[key], np.float64) for g, _ in micro],
                         axis=0) for key in SHAPES}
    want = ref.step(tree_norm64(mean.values()), mean_loss)
    assert int(state.inner_opt_state.skipped) == want["skip"], i
    assert want["skip"] or i != 30
  assert all(np.isfinite(np.asarray(p)).all() for p in params.values())
  assert int(state.inner_opt_state.nonfinite_count) == 0


def test_apply_if_finite_around_skip_spikes():
  # apply_if_finite rejects NaN steps before skip_spikes sees them; when it
  # gives up (3 in a row here), skip_spikes still skips the step.
  run = make_run(40, seed=2, events={30: ("norm", 30.0)})
  tx = optax.apply_if_finite(_skip_tx(7, 3.0), max_consecutive_errors=2)
  step = _step(tx)
  params = _params()
  state = tx.init(params)
  ref = SkipSpikesRef(window=7, sigma=3.0)
  for t, (grads, loss) in enumerate(run):
    if t == 20:
      for n in range(3):
        before_params, before = params, state.inner_state
        params, state, _ = step(params, state, _poison(grads), loss)
        _assert_bit_identical(params, before_params)
        given_up = n == 2
        assert int(state.inner_state.nonfinite_count) == given_up
        if not given_up:
          _assert_bit_identical(state.inner_state, before)
        else:
          ref.step(math.nan, loss)
          _assert_bit_identical(state.inner_state.inner_state,
                                before.inner_state)
    params, state, _ = step(params, state, grads, loss)
    skip = ref.step(tree_norm64(grads.values()), loss)["skip"]
    assert int(state.inner_state.skipped) == skip, t
    assert skip or t != 30
  assert int(state.total_notfinite) == 3
  assert int(state.inner_state.skip_count) == ref.skips
  assert int(state.inner_state.nonfinite_count) == ref.nonfinite == 1


def test_apply_if_finite_inside_skip_spikes():
  run = make_run(40, seed=2, events={30: ("norm", 30.0)})
  tx = optax_zclip.skip_spikes(
      optax.apply_if_finite(
          optax.chain(optax_zclip.zclip(**ZCLIP), optax.adamw(LR)), 2),
      window=7, sigma=3.0)
  step = _step(tx)
  params = _params()
  state = tx.init(params)
  ref = SkipSpikesRef(window=7, sigma=3.0)
  for t, (grads, loss) in enumerate(run):
    if t == 20:
      before_params, before = params, state.inner_state
      params, state, _ = step(params, state, _poison(grads), loss)
      _assert_bit_identical(params, before_params)
      # apply_if_finite's own counters did not move: the step never was.
      _assert_bit_identical(state.inner_state, before)
      ref.step(math.nan, loss)
    params, state, _ = step(params, state, grads, loss)
    skip = ref.step(tree_norm64(grads.values()), loss)["skip"]
    assert int(state.skipped) == skip, t
    assert skip or t != 30
  assert int(state.skip_count) == ref.skips
  assert int(state.nonfinite_count) == ref.nonfinite == 1


def test_inject_hyperparams_changes_sigma_during_training():
  run = make_run(50, seed=4, events={20: ("loss", 0.3), 40: ("loss", 0.3)})
  tx = optax.inject_hyperparams(optax_zclip.skip_spikes,
                                static_args=("window",))(
      optax.chain(optax_zclip.zclip(**ZCLIP), optax.adamw(LR)),
      window=7, sigma=1e3)
  step = _step(tx)
  params = _params()
  state = tx.init(params)
  ref = SkipSpikesRef(window=7, sigma=1e3)
  for t, (grads, loss) in enumerate(run):
    if t == 30:  # a tighter threshold from here on
      state.hyperparams["sigma"] = jnp.asarray(3.0, jnp.float32)
      ref.sigma = 3.0
    params, state, _ = step(params, state, grads, loss)
    want = ref.step(tree_norm64(grads.values()), loss)
    assert int(state.inner_state.skipped) == want["skip"], t
    if t in (20, 40):  # the same outlier, through at 20, skipped at 40
      assert want["skip"] == (t == 40)
  assert step._cache_size() == 1


def test_window_must_be_static_under_inject_hyperparams():
  inner = optax.sgd(1.0)
  with pytest.raises(ValueError, match="static_args=\\('window',\\)"):
    optax.inject_hyperparams(optax_zclip.skip_spikes)(
        inner, window=8).init({"w": jnp.zeros(2)})


# --------------------------------------------------------------------------
# Selecting after the update: asked for with zero_copy=False, or taken with
# a warning where the zero-copy select cannot run. Same values either way.


def _wrapped(name, **skip_kwargs):
  """``skip_spikes`` around ``chain(<entry>, adamw)``, for every entry."""
  e = TRANSFORMS[name]
  if name in WRAPPERS:
    chain = optax.chain(e.make(), optax.adamw(1e-2))
    return e.wrapper.factory(chain, **e.wrapper.config, **skip_kwargs)
  return optax_zclip.skip_spikes(with_adamw(name), window=8, sigma=3.0,
                                 **skip_kwargs)


def _donated_run(tx, run):
  """Per step: (updates, state, stats) on the host, of a donated jitted run
  with a bf16 leaf among the float32 ones."""
  def train_step(params, state, grads, loss):
    updates, state = tx.update(grads, state, params, value=loss)
    return (optax.apply_updates(params, updates), state, updates,
            optax_zclip.stats(state))

  step = jax.jit(train_step, donate_argnums=(0, 1))
  params = {**_params(), "b1": _params()["b1"].astype(jnp.bfloat16)}
  state = tx.init(params)
  rows = []
  for grads, loss in run:
    grads = {**grads, "b1": jnp.asarray(grads["b1"], jnp.bfloat16)}
    params, state, updates, logged = step(params, state, grads, loss)
    rows.append(jax.device_get((updates, state, logged)))
  return rows


# Norm, loss, both and non-finite outliers once the test is active.
AFTER_RUN = make_run(36, seed=11, events={
    10: ("norm", 30.0), 14: ("loss", 3.0), 18: ("nan_grad",),
    19: ("inf_loss",), 24: ("both", 20.0, 3.0), 30: ("inf_grad",)})


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_selecting_after_gives_the_same_updates_states_and_stats(name):
  # Any warning is an error here: zero_copy=False is a choice, not a
  # fallback, and says nothing.
  fast = _donated_run(_wrapped(name), AFTER_RUN)
  after = _donated_run(_wrapped(name, zero_copy=False), AFTER_RUN)
  for t, (a, b) in enumerate(zip(fast, after, strict=True)):
    _assert_bit_identical(a, b, f"step {t}")
  skipped = [int(state.skipped) for _, state, _ in fast]
  assert skipped[10] and skipped[18] and skipped[19] and skipped[30]
  assert sum(skipped) < len(skipped) // 2


class _OddPrimitive(jax.extend.core.Primitive):
  """The identity, as a third-party primitive whose bind parameters the
  zero-copy select cannot read: given in a shape it does not know (a list),
  or, with ``fails``, not at all (its ``get_bind_params`` raises). JAX's own
  tracing and lowering never ask for them; only a jaxpr evaluation does."""

  def __init__(self, fails=False):
    super().__init__("odd_identity")
    self.def_impl(lambda x: x)
    self.def_abstract_eval(lambda x: x)
    jax.interpreters.mlir.register_lowering(
        self, jax.interpreters.mlir.lower_fun(lambda x: x,
                                              multiple_results=False))
    self.fails = fails

  def get_bind_params(self, params):
    if self.fails:
      raise RuntimeError("a rule this select does not know")
    return [params]  # neither (subfuns, params) nor params


def _through(prim):
  """An optax transform that passes each update through ``prim``."""
  return optax.stateless(lambda u, p: jax.tree.map(prim.bind, u))


# What makes the zero-copy select fail, and what the warning must say of it.
CAUSES = {
    "odd_bind_params": (lambda: _OddPrimitive(),
                        "get_bind_params of odd_identity returned a list"),
    "bind_params_raise": (
        lambda: _OddPrimitive(fails=True),
        "binding odd_identity failed: RuntimeError: a rule this select"),
}


@pytest.mark.parametrize("cause", list(CAUSES))
def test_a_select_that_cannot_run_falls_back_naming_the_cause(cause):
  make_prim, says = CAUSES[cause]
  run = AFTER_RUN[:14]
  plain = optax.stateless(lambda u, p: u)  # the same chain, all known
  want = _donated_run(optax_zclip.skip_spikes(
      optax.chain(plain, with_adamw("zclip")), window=8, sigma=3.0), run)
  tx = optax_zclip.skip_spikes(
      optax.chain(_through(make_prim()), with_adamw("zclip")),
      window=8, sigma=3.0)
  with pytest.warns(optax_zclip.SkipSpikesFallbackWarning) as record:
    got = _donated_run(tx, run)
  # One warning for the one trace of the step, not one per step.
  assert len(record) == 1, [str(w.message) for w in record]
  message = str(record[0].message)
  for what in (says, f"jax {jax.__version__}", "zero_copy=False"):
    assert what in message, message
  for t, (a, b) in enumerate(zip(want, got, strict=True)):
    _assert_bit_identical(a, b, f"step {t}")


def test_the_fallback_warns_once_per_trace():
  tx = optax_zclip.skip_spikes(
      optax.chain(_through(_OddPrimitive()), with_adamw("zclip")),
      window=8, sigma=3.0)
  params = _params()
  grads, loss = AFTER_RUN[0]
  step = jax.jit(lambda g, s: tx.update(g, s, params, value=loss))
  with pytest.warns(optax_zclip.SkipSpikesFallbackWarning) as record:
    state = tx.init(params)
    for _ in range(3):
      _, state = step(grads, state)  # traced once
    tx.update(grads, state, params, value=loss)  # not jitted: traced again
  assert len(record) == 2, [str(w.message) for w in record]


def test_zero_copy_must_be_a_bool():
  with pytest.raises(ValueError, match="zero_copy"):
    optax_zclip.skip_spikes(optax.sgd(1.0), zero_copy="yes")


def _scoped(inner, scope):
  """``inner`` with its update traced inside ``jax.named_scope(scope)``."""
  def update(updates, state, params=None, **extra_args):
    del extra_args
    with jax.named_scope(scope):
      return inner.update(updates, state, params)

  return optax.GradientTransformation(inner.init, update)


def _scope_names(tx, scope, **extra_args):
  """The op names under ``scope`` in the lowered step, with the scopes
  above it cut off, counted."""
  params = _params()
  state = tx.init(params)

  def step(p, s, g):
    with jax.named_scope("train_step"):
      u, s = tx.update(g, s, p, **extra_args)
    return optax.apply_updates(p, u), s

  # The module with its locations (jax 0.4.36 has no as_text(debug_info=)).
  text = jax.jit(step).lower(params, state, params).compiler_ir(
      "stablehlo").operation.get_asm(enable_debug_info=True)
  names = re.findall(rf'"[^"]*/train_step/(?:[^"/]*/)*{scope}/([^"]*)"', text)
  # A bare "jit" or "pjit" names the call site of a nested jit (a location,
  # no op of the update's own), which releases write differently; so are
  # the ops inside a nested jit (jax.numpy's `where`): jax 0.4.36 names them
  # by the jit's own scopes alone once its call is bound again. The update's
  # own ops are compared.
  return collections.Counter(n for n in names
                             if n not in ("jit", "pjit") and "jit(" not in n)


@pytest.mark.parametrize("zero_copy", [True, False])
def test_the_inner_update_keeps_its_named_scopes(zero_copy):
  # On GPU/TPU profiles an op is known by its scope: the inner update's ops
  # carry its jax.named_scope in skip_spikes as they do in the bare chain
  # (under skip_spikes' caller's scope), each of them. (jax 0.4.36 also
  # names the select after the update by the scope, zero_copy=False: an op
  # more is no name lost.)
  inner = _scoped(optax.adamw(1e-2), "inner_update")
  bare = _scope_names(inner, "inner_update")
  assert sum(bare.values()) >= 10  # AdamW's moments, bias corrections, ...
  wrapped = _scope_names(
      optax_zclip.skip_spikes(inner, window=8, zero_copy=zero_copy),
      "inner_update", value=jnp.float32(1.0))
  assert not bare - wrapped, bare - wrapped  # every op, as often
# --------------------------------------------------------------------------
# An update without a loss: a warning, unless the norm test alone is asked
# for.


def _value_reader():
  """An inner transform whose state is the last ``value`` it was given."""
  def update(updates, state, params=None, *, value=None, **_):
    del state, params
    return updates, jnp.asarray(jnp.nan if value is None else value,
                                jnp.float32)

  return optax.GradientTransformationExtraArgs(
      lambda p: jnp.zeros([], jnp.float32), update)


def test_an_update_without_value_warns_once_per_trace_and_tests_the_norm():
  run = make_run(40, seed=5, events={20: ("loss", 9.0), 30: ("norm", 30.0)})
  tx = _skip_tx(7, 3.0)
  params = _params()
  bare = jax.jit(lambda p, s, g: tx.update(g, s, p))
  asked = jax.jit(lambda p, s, g: tx.update(g, s, p, value=None))
  with pytest.warns(optax_zclip.SkipSpikesNoLossWarning,
                    match=r"without `value=`.*Pass the step's loss: "
                    r"tx.update\(grads, state, params, value=loss\).*"
                    r"optimizer.update\(model, grads, value=loss\).*"
                    r"value=None, or skip_spikes\(inner, loss_test=False\)"
                    ) as record:
    states = [tx.init(params)] * 2
    for grads, _ in run:
      states[0] = bare(params, states[0], grads)[1]  # traced once
    jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, params))(
        run[0][0], states[0])  # traced again
  assert len(record) == 2, [str(w.message) for w in record]
  assert record[0].filename == __file__  # points at the caller's line
  for grads, _ in run:
    states[1] = asked(params, states[1], grads)[1]
  # The norm test alone, as asked for with value=None, bit for bit, and the
  # same computation: the warning left nothing in the trace.
  _assert_bit_identical(states[0], states[1])
  ref = SkipSpikesRef(window=7, sigma=3.0)
  skips = [t for t, (g, _) in enumerate(run)
           if ref.step(tree_norm64(g.values()))["skip"]]
  assert int(states[0].skip_count) == len(skips)
  assert 30 in skips and 20 not in skips  # the norm spike, not the loss one
  assert str(jaxpr) == str(jax.make_jaxpr(
      lambda g, s: tx.update(g, s, params, value=None))(run[0][0],
                                                        states[0]))


def test_value_none_and_loss_test_false_ask_for_the_norm_alone_silently():
  run = make_run(30, seed=5, events={20: ("loss", 9.0)})
  params = _params()
  quiet = optax_zclip.skip_spikes(_value_reader(), window=7, sigma=3.0,
                                  loss_test=False)
  loud = optax_zclip.skip_spikes(_value_reader(), window=7, sigma=3.0)
  with warnings.catch_warnings():
    warnings.simplefilter("error", optax_zclip.SkipSpikesNoLossWarning)
    s_none, s_off, s_off_value = (t.init(params) for t in (loud, quiet,
                                                           quiet))
    for grads, loss in run:
      s_none = loud.update(grads, s_none, params, value=None)[1]
      s_off = quiet.update(grads, s_off, params)[1]
      # The loss reaches the inner transform (on a step taken), untested.
      s_off_value = quiet.update(grads, s_off_value, params, value=loss)[1]
      if not int(s_off_value.skipped):
        assert float(s_off_value.inner_state) == np.float32(loss)
  skips = np.asarray(s_off_value.skip_count)
  for state in (s_off, s_off_value):
    _assert_bit_identical(state._replace(inner_state=0),
                          s_none._replace(inner_state=0))
  assert not np.asarray(s_off_value.has_loss).any()
  # With the loss test on, the same run skips the loss spike too.
  state = loud.init(params)
  for grads, loss in run:
    state = loud.update(grads, state, params, value=loss)[1]
  assert int(state.skip_count) == skips + 1


# --------------------------------------------------------------------------
# Adding skip_spikes to a run resumed from a checkpoint taken without it.


@pytest.mark.parametrize("window", [2, 7, 128])
def test_init_around_builds_what_init_builds_around_the_given_state(window):
  inner = optax.chain(optax_zclip.zclip(**ZCLIP), optax.adamw(LR))
  tx = optax_zclip.skip_spikes(inner, window=window, sigma=3.0)
  params = _params()
  inner_state = inner.init(params)
  state = optax_zclip.init_around(tx, inner_state)
  _assert_bit_identical(state, tx.init(params))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(tx.init(params)),
                  strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
  # The given state itself, not a copy.
  assert all(a is b for a, b in zip(jax.tree.leaves(state.inner_state),
                                    jax.tree.leaves(inner_state),
                                    strict=True))


def test_init_around_refuses_what_is_not_skip_spikes_and_its_inner_state():
  inner = optax.adamw(LR)
  tx = optax_zclip.skip_spikes(inner, window=4)
  params = _params()
  for other in (inner, optax.MultiSteps(tx, 2), optax_zclip.zclip(), None):
    with pytest.raises(TypeError, match=r"^init_around: `tx` must be the "
                       r"transform skip_spikes\(\) returned"):
      optax_zclip.init_around(other, inner.init(params))
  with pytest.raises(TypeError, match="already a SkipSpikesState"):
    optax_zclip.init_around(tx, tx.init(params))


def test_a_state_of_another_window_is_refused():
  inner = optax.sgd(1.0)
  params = _params()
  other = optax_zclip.skip_spikes(inner, window=4).init(params)
  tx = optax_zclip.skip_spikes(inner, window=8)
  grads = make_run(1, 0, {})[0][0]
  with pytest.raises(ValueError, match=r"history has shape \(4,\), but this "
                     r"transform's window is 8.*init_around"):
    jax.jit(tx.update)(grads, other, params, value=1.0)


def test_skip_spikes_added_to_a_run_resumed_from_a_checkpoint_without_it(
    tmp_path):
  import orbax.checkpoint as ocp  # noqa: PLC0415 (this test's alone)

  window, sigma, save_at = 7, 3.0, 16
  run = make_run(40, seed=12, events={27: ("both", 20.0, 3.0),
                                      33: ("loss", 8.0)})
  inner = optax.chain(optax_zclip.zclip(**ZCLIP), optax.adamw(LR))
  inner_step = _step(inner)
  params = _params()
  state = inner.init(params)
  for grads, loss in run[:save_at]:  # a run without skip_spikes
    params, state, _ = inner_step(params, state, grads, loss)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
    ckptr.wait_until_finished()
    # A new process: the target from the inner optimizer, as saved.
    fresh = _params()
    # A concrete target, which gives each leaf's sharding: without one,
    # orbax-checkpoint 0.11 warns that it reads it from the files.
    target = {"params": fresh, "opt_state": inner.init(fresh)}
    restored = ckptr.restore(tmp_path / "ckpt", target)
  _assert_bit_identical(restored, {"params": params, "opt_state": state})

  tx = optax_zclip.skip_spikes(inner, window=window, sigma=sigma)
  step = _step(tx)
  params = restored["params"]
  state = optax_zclip.init_around(tx, restored["opt_state"])
  # The unwrapped chain from the same state, fed the kept steps only, and
  # the float64 rule from an empty history.
  p_ref, s_ref = restored["params"], restored["opt_state"]
  ref = SkipSpikesRef(window=window, sigma=sigma)
  skipped = []
  for t, (grads, loss) in enumerate(run[save_at:], start=save_at):
    before = state.inner_state
    params, state, updates = step(params, state, grads, loss)
    assert int(state.skipped) == ref.step(tree_norm64(grads.values()),
                                          loss)["skip"], t
    if int(state.skipped):
      skipped.append(t)
      _assert_bit_identical(state.inner_state, before, f"step {t}")
      assert not any(np.asarray(u).any() for u in jax.tree.leaves(updates))
      continue
    p_ref, s_ref, want = inner_step(p_ref, s_ref, grads, None)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want),
                    strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=t)
  assert skipped == [27, 33]
  # The restored statistics carried on: ZClip counted every step taken.
  assert int(state.inner_state[0].count) == len(run) - len(skipped)
  for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(s_ref),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------
# Telemetry, checkpoints, the compiled step.


SKIP_KEYS = {"skip/size", "skip/skipped", "skip/skip_count",
             "skip/nonfinite_count", "skip/grad_norm", "skip/loss_threshold",
             "skip/norm_threshold"}


def test_stats_report_the_skip_and_the_inner_zclip_telemetry():
  run = make_run(20, seed=6, events={15: ("norm", 30.0)})
  tx = _skip_tx(7, 3.0)
  step = _step(tx)
  params = _params()
  state = tx.init(params)
  for grads, loss in run:
    params, state, _ = step(params, state, grads, loss)
  s = jax.jit(optax_zclip.stats)(state)
  # ZClip's keys are those it has alone: wrapping a chain renames nothing.
  zclip_keys = set(optax_zclip.stats(optax_zclip.zclip().init(None)))
  assert zclip_keys and all(k.startswith("zclip/") for k in zclip_keys)
  assert set(s) == SKIP_KEYS | zclip_keys
  assert int(s["skip/skip_count"]) == 1 and int(s["skip/skipped"]) == 0
  assert int(s["zclip/count"]) == 19
  np.testing.assert_allclose(s["skip/grad_norm"],
                             tree_norm64(run[-1][0].values()), rtol=1e-5)
  for k, v in s.items():
    assert v.shape == () and v.dtype in (jnp.int32, jnp.float32), k
  # Alone, its keys are the same.
  bare = optax_zclip.skip_spikes(optax.adamw(LR), window=4)
  assert set(optax_zclip.stats(bare.init(params))) == SKIP_KEYS


def test_no_two_leaves_of_a_fresh_or_updated_state_share_a_buffer():
  tx = _skip_tx(4, 3.0)
  params = _params()
  for state in (tx.init(params),
                tx.update(make_run(1, 0, {})[0][0], tx.init(params), params,
                          value=1.0)[1]):
    ptrs = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
    assert len(set(ptrs)) == len(ptrs)


def test_orbax_restore_mid_window_continues_bit_identically(tmp_path):
  import orbax.checkpoint as ocp  # noqa: PLC0415 (this test's alone)

  window, sigma = 7, 3.0
  run = make_run(40, seed=9, events={12: ("norm", 30.0), 24: ("loss", 3.0),
                                     30: ("both", 20.0, 3.0)})
  save_at = 17  # the buffer has wrapped; its oldest slot is mid-vector
  tx = _skip_tx(window, sigma)

  def train_step(params, state, grads, loss):
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  step = jax.jit(train_step, donate_argnums=(0, 1))
  params = _params()
  state = tx.init(params)
  with ocp.StandardCheckpointer() as ckptr:
    for t, (grads, loss) in enumerate(run):
      if t == save_at:
        ckptr.save(tmp_path / "ckpt", {"params": params, "state": state})
        ckptr.wait_until_finished()  # the next step donates these buffers
        assert int(state.size) == window and int(state.position) != 0
      params, state = step(params, state, grads, loss)
    uninterrupted = (params, state)
    assert int(state.skip_count) >= 2
    # The target a new process builds: shapes, dtypes and shardings.
    params = _params()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            {"params": params, "state": tx.init(params)})
    restored = ckptr.restore(tmp_path / "ckpt", abstract)
  params, state = restored["params"], restored["state"]
  assert isinstance(state, optax_zclip.SkipSpikesState)
  skips_before = int(state.skip_count)
  for grads, loss in run[save_at:]:
    params, state = step(params, state, grads, loss)
  _assert_bit_identical((params, state), uninterrupted)
  assert int(state.skip_count) > skips_before  # skips after the restore


def _compiled_text(tx):
  params = {k: jnp.zeros(s) for k, s in HLO_SHAPES.items()}
  state = tx.init(params)

  def step(params, state, grads, loss):
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, params, jnp.float32(1.0)).compile().as_text()


HLO_SHAPES = {"a": (96, 160), "b": (224,), "c": (3, 40, 72)}


def _normal_path(text):
  """The computations a step runs unless a conditional branch is taken.

  The norms' second pass, for a float32 sum of squares that overflows, is
  a conditional's branch, run only on such a step: left out here.
  """
  bodies = {m.group(1): m.group(0) for m in re.finditer(
      r"^(?:ENTRY )?%([\w.\-]+) \(.*?^}", text, flags=re.S | re.M)}
  entry = re.search(r"^ENTRY %([\w.\-]+)", text, flags=re.M).group(1)
  seen, todo = set(), [entry]
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    todo += re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)",
                       bodies[name])
  return "\n".join(bodies[name] for name in seen)


def _reduced_shapes(text):
  """The shape of the operand of every reduce a normal step runs."""
  types = dict(re.findall(r"%([\w.\-]+) = (\w+\[[\d,]*\])", text))
  return [types[operand] for operand in
          re.findall(r"= \S+ reduce\(%([\w.\-]+)", _normal_path(text))]


def _gradient_reductions(text):
  return sorted(s for s in _reduced_shapes(text)
                if s in ("f32[96,160]", "f32[3,40,72]"))


def _gradient_buffers(text):
  """How many gradient-sized arrays the step's fusions write out."""
  entry = text[text.index("\nENTRY"):]
  return [len(re.findall(rf"= f32\[{','.join(map(str, s))}\]\S* fusion\(",
                         entry)) for s in HLO_SHAPES.values()]


@measured_on("0.10.2", "0.12.0.1", "XLA's fusion decisions in the "
             "compiled HLO text")
@pytest.mark.parametrize("clip", [
    optax_zclip.zclip, lambda: optax_zclip.clip_by_global_norm(1.0)],
                         ids=["zclip", "clip_by_global_norm"])
def test_the_norm_is_reduced_once_when_the_inner_clip_measures_it_too(clip):
  alone = _gradient_reductions(_compiled_text(
      optax.chain(clip(), optax.adamw(1e-3))))
  assert alone == ["f32[3,40,72]", "f32[96,160]"]  # one read per leaf
  # Wrapped, XLA merges skip_spikes' norm with the clip's (the same
  # reduction of the same updates): still one per leaf.
  wrapped_text = _compiled_text(optax_zclip.skip_spikes(
      optax.chain(clip(), optax.adamw(1e-3))))
  assert _gradient_reductions(wrapped_text) == alone
  # The selects of a skip fuse into AdamW's passes: no array written more.
  assert _gradient_buffers(wrapped_text) == _gradient_buffers(_compiled_text(
      optax.chain(clip(), optax.adamw(1e-3))))
  # The check sees a second read: a clip measuring scaled updates cannot
  # share the norm.
  apart = _gradient_reductions(_compiled_text(optax_zclip.skip_spikes(
      optax.chain(optax.scale(2.0), clip(), optax.adamw(1e-3)))))
  assert apart == sorted(alone * 2)


def _overflow_passes(tx):
  """How many overflow-safe norm passes (conditionals) the traced step has."""
  params = {k: jnp.zeros(s) for k, s in HLO_SHAPES.items()}
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(
      lambda g, s: tx.update(g, s, params, value=jnp.float32(1.0)))(
          params, state)
  return len(re.findall(r"\bcond\[", str(jaxpr)))


@pytest.mark.parametrize("name", CLIPPERS)
def test_the_inner_clip_reuses_the_measured_norms_in_the_trace(name):
  # XLA merges two identical norms in the end (the test above), but it
  # compiles both until then; the inner clip of the same updates takes
  # skip_spikes' norms instead, so the step is traced with one overflow pass.
  clip = TRANSFORMS[name].make
  assert _overflow_passes(optax.chain(clip(), optax.adamw(1e-3))) == 1
  assert _overflow_passes(optax_zclip.skip_spikes(
      optax.chain(clip(), optax.adamw(1e-3)))) == 1
  # Updates scaled first are other arrays: measured again.
  assert _overflow_passes(optax_zclip.skip_spikes(
      optax.chain(optax.scale(2.0), clip(), optax.adamw(1e-3)))) == 2
  assert not _shared_norms._offered()  # noqa: SLF001 (none left behind)
