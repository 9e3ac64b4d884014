"""The training loops of the Integrations guide: Flax Linen and Equinox.

Each loop trains a small model on batches with one bad batch (inputs x30: a
gradient-norm spike) and one batch whose loss carries a constant offset of
100 (a loss spike with an ordinary gradient). Its clipping and skipping
decisions are checked against the float64 rules on the float64 norms of the
gradients it computed, and its parameters and telemetry against the plain
Optax loop (``tx.update`` then ``optax.apply_updates``) fed the same
gradients. Marked ``examples``: Flax and Equinox are not library
dependencies.
"""

from __future__ import annotations

import functools
import re

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from references import SkipSpikesRef, ZClipRef, tree_norm64

import optax_zclip

pytestmark = pytest.mark.examples

STEPS, NORM_SPIKE, LOSS_SPIKE, WARMUP, WINDOW = 24, 20, 10, 5, 8


def _batch(t):
  rng = np.random.default_rng(500 + t)
  x = rng.standard_normal((16, 4)).astype(np.float32)
  y = np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)
  if t == NORM_SPIKE:
    x = 30.0 * x
  offset = np.float32(100.0 if t == LOSS_SPIKE else 0.0)
  return jnp.asarray(x), jnp.asarray(y), offset


def _mse(pred, y, offset):
  # `offset` has no gradient: at LOSS_SPIKE the loss jumps, the norm does not.
  return jnp.mean((pred - y) ** 2) + offset


def _documented_keys(*kinds):
  """The `stats` keys its docstring lists for these kinds."""
  doc = " ".join(optax_zclip.stats.__doc__.split())
  keys = set()
  for kind in kinds:
    item = re.search(rf"``{kind}/`` \(`\w+`\): (.*?);", doc).group(1)
    keys |= {f"{kind}/{f}" for f in re.findall(r"``(\w+)", item)}
  return keys


def _gradient_sized(tree):
  """The params and AdamW's moments in ``tree``: the buffers a donated step
  must consume. (The telemetry scalars that the next update does not read
  are not inputs of the compiled step, so JAX leaves them alone.)"""
  return [a for a in jax.tree.leaves(tree)
          if isinstance(a, jax.Array) and a.ndim]


def _run_donated(step, carry):
  """Runs ``step(carry, *_batch(t))`` for every step, checking each time
  that the old gradient-sized buffers were donated. ``step`` returns the new
  carry, the loss, the gradients and `stats`. Returns the carry and the
  logged stats, gradients and losses."""
  logged, grads_seq, losses = [], [], []
  for t in range(STEPS):
    old = _gradient_sized(carry)
    carry, loss, grads, s = step(carry, *_batch(t))
    assert all(a.is_deleted() for a in old)  # donated
    logged.append(s)
    grads_seq.append(grads)
    losses.append(float(loss))
  return carry, logged, grads_seq, losses


def _zclip_tx():
  return optax.chain(optax_zclip.zclip(warmup_steps=WARMUP),
                     optax.adamw(1e-2))


def _skip_tx():
  return optax_zclip.skip_spikes(_zclip_tx(), window=WINDOW, sigma=4.0)


def _plain_loop(tx, params, grads_seq, losses=None):
  """The plain Optax loop on given gradients: params and stats per step."""
  @jax.jit
  def step(params, state, grads, loss):
    extra = {} if loss is None else {"value": loss}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, optax_zclip.stats(state)

  state, logged = tx.init(params), []
  for t, grads in enumerate(grads_seq):
    params, state, s = step(params, state, grads,
                            None if losses is None else losses[t])
    logged.append(s)
  return params, logged


def _assert_same_run(params, logged, ref_params, ref_logged):
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  for t, (s, r) in enumerate(zip(logged, ref_logged, strict=True)):
    assert set(s) == set(r), t
    for k in s:
      np.testing.assert_array_equal(s[k], r[k], err_msg=f"{k} at step {t}")


def _check_zclip_decisions(logged, norms):
  ref = ZClipRef(warmup_steps=WARMUP)
  for t, (s, g) in enumerate(zip(logged, norms, strict=True)):
    want = ref.step(g)
    np.testing.assert_allclose(s["zclip/grad_norm"], g, rtol=1e-5)
    np.testing.assert_allclose(s["zclip/clipped_norm"], g * want["scale"],
                               rtol=1e-5, err_msg=str(t))
  assert ref.spikes >= 1  # the bad batch


def _check_skip_decisions(logged, norms, losses):
  ref = SkipSpikesRef(window=WINDOW, sigma=4.0)
  skipped = []
  for t, (s, g, x) in enumerate(zip(logged, norms, losses, strict=True)):
    want = ref.step(g, x)
    assert int(s["skip/skipped"]) == want["skip"], t
    skipped.append(want["skip"])
  return skipped


# --------------------------------------------------------------------------
# Flax Linen, `flax.training.train_state.TrainState`.


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(nn.gelu(nn.Dense(16)(x)))


class _TrainStateWithLoss(train_state.TrainState):
  """`TrainState` whose `apply_gradients` hands the loss to the optimizer."""

  def apply_gradients(self, *, grads, value, **kwargs):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        value=value)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)


def _linen_run(state_cls, tx, pass_loss):
  model = _LinenMLP()
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  state = state_cls.create(apply_fn=model.apply,
                           params=jax.tree.map(jnp.copy, params), tx=tx)

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, x, y, offset):
    def loss_fn(params):
      return _mse(state.apply_fn({"params": params}, x), y, offset)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    if pass_loss:
      state = state.apply_gradients(grads=grads, value=loss)
    else:
      state = state.apply_gradients(grads=grads)
    return state, loss, grads, optax_zclip.stats(state.opt_state)

  state, logged, grads_seq, losses = _run_donated(train_step, state)
  return params, state, logged, grads_seq, losses


def test_linen_train_state_with_zclip_decides_as_the_plain_loop():
  params0, state, logged, grads_seq, _ = _linen_run(
      train_state.TrainState, _zclip_tx(), pass_loss=False)
  norms = [tree_norm64(jax.tree.leaves(g)) for g in grads_seq]
  _check_zclip_decisions(logged, norms)
  assert set(logged[0]) == _documented_keys("zclip")
  assert optax_zclip.stats(state).keys() == logged[0].keys()
  _assert_same_run(state.params, logged,
                   *_plain_loop(_zclip_tx(), params0, grads_seq))


def test_linen_train_state_passing_the_loss_skips_the_loss_spike():
  params0, state, logged, grads_seq, losses = _linen_run(
      _TrainStateWithLoss, _skip_tx(), pass_loss=True)
  norms = [tree_norm64(jax.tree.leaves(g)) for g in grads_seq]
  skipped = _check_skip_decisions(logged, norms, losses)
  # The loss spike has an ordinary norm: only the loss test can skip it.
  assert skipped[NORM_SPIKE] and skipped[LOSS_SPIKE]
  assert norms[LOSS_SPIKE] < 2 * np.median(norms)
  assert int(state.step) == STEPS
  assert set(logged[0]) == _documented_keys("skip", "zclip")
  _assert_same_run(state.params, logged,
                   *_plain_loop(_skip_tx(), params0, grads_seq, losses))


def test_linen_apply_gradients_without_the_loss_takes_the_loss_spike():
  # Flax's own `apply_gradients` passes no loss: the loss test never runs,
  # and skip_spikes says so once, when the step is traced, naming the fix.
  with pytest.warns(optax_zclip.SkipSpikesNoLossWarning,
                    match="value=loss.*Integrations guide's apply_gradients"
                    ) as record:
    _, state, logged, grads_seq, losses = _linen_run(
        train_state.TrainState, _skip_tx(), pass_loss=False)
  assert len(record) == 1, [str(w.message) for w in record]
  norms = [tree_norm64(jax.tree.leaves(g)) for g in grads_seq]
  skipped = _check_skip_decisions(logged, norms, [None] * STEPS)
  assert skipped[NORM_SPIKE] and not skipped[LOSS_SPIKE]
  assert float(logged[LOSS_SPIKE]["skip/loss_threshold"]) == np.inf


# --------------------------------------------------------------------------
# Equinox: `eqx.filter_jit`, `eqx.partition`, donation.


def _eqx_run(tx):
  model = eqx.nn.MLP(4, 1, width_size=16, depth=1, activation=jax.nn.gelu,
                     key=jax.random.key(0))
  params0 = jax.tree.map(jnp.copy, eqx.filter(model, eqx.is_inexact_array))
  opt_state = tx.init(params0)

  @eqx.filter_jit(donate="all")
  def train_step(model, opt_state, x, y, offset):
    def loss_fn(model):
      return _mse(jax.vmap(model)(x), y, offset)

    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    updates, opt_state = tx.update(grads, opt_state,
                                   eqx.filter(model, eqx.is_inexact_array),
                                   value=loss)
    model = eqx.apply_updates(model, updates)
    return model, opt_state, loss, grads, optax_zclip.stats(opt_state)

  def step(carry, *batch):
    model, opt_state, loss, grads, s = train_step(*carry, *batch)
    return (model, opt_state), loss, grads, s

  (model, _), logged, grads_seq, losses = _run_donated(
      step, (model, opt_state))
  return params0, model, logged, grads_seq, losses


def test_equinox_loop_skips_and_clips_as_the_plain_loop():
  params0, model, logged, grads_seq, losses = _eqx_run(_skip_tx())
  # The gradients hold None where the model holds no array (the
  # activation function); the norms are those of the arrays.
  assert any(g is None for g in jax.tree.leaves(
      grads_seq[0], is_leaf=lambda x: x is None))
  norms = [tree_norm64(jax.tree.leaves(g)) for g in grads_seq]
  skipped = _check_skip_decisions(logged, norms, losses)
  assert skipped[NORM_SPIKE] and skipped[LOSS_SPIKE]
  kept = [s for s, k in zip(logged, skipped, strict=True) if not k]
  assert int(kept[-1]["zclip/count"]) == STEPS - sum(skipped)
  assert set(logged[0]) == _documented_keys("skip", "zclip")
  params, plain = _plain_loop(_skip_tx(), params0, grads_seq, losses)
  _assert_same_run(eqx.filter(model, eqx.is_inexact_array), logged,
                   params, plain)


def test_equinox_loop_with_zclip_alone_matches_the_reference():
  _, _, logged, grads_seq, _ = _eqx_run(_zclip_tx())
  norms = [tree_norm64(jax.tree.leaves(g)) for g in grads_seq]
  _check_zclip_decisions(logged, norms)
