"""Flax NNX training loops around every transform: what the examples run.

``nnx.Optimizer`` with each registry entry before AdamW under
``nnx.jit(donate_argnums=(0, 1))`` (model and optimizer updated in place,
one compilation, the norms checked against float64), an Orbax checkpoint of
the donated state restored mid-run and continued bit-identically, and
`skip_spikes` given the loss through ``optimizer.update(..., value=loss)``.
The same without Flax, under ``jax.jit`` with donation, is in
``test_donation.py`` and ``test_skip.py``. Marked ``examples``: Flax is the
examples' dependency, not the library's (``--library-only`` leaves it out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from references import SkipSpikesRef, ZClipRef, tree_norm64
from test_donation import STEPS, _assert_bits_equal
from test_skip import _skip_tx
from test_stats import (
  _KEYS,
  DECLARED,
  KEYS,
  SKIP_KEYS,
  _check_against_reference,
  check_found,
  make_declared,
  nesting_grads,
)
from transforms import (
  CLIPPERS,
  KINDS,
  SPIKE,
  TRANSFORMS,
  chain_state,
  counted_steps,
  grad_norm,
  with_adamw,
  wrapper_reference,
)

import optax_zclip

pytestmark = pytest.mark.examples


class _MLP(nnx.Module):
  """``features -> hidden -> 1``, with ``act`` between."""

  def __init__(self, rngs, features=4, hidden=8, act=nnx.relu):
    self.l1 = nnx.Linear(features, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, 1, rngs=rngs)
    self.act = act

  def __call__(self, x):
    return self.l2(self.act(self.l1(x)))


def _model(seed):
  """The donation tests' model: 6 features, 16 hidden units, GELU."""
  return _MLP(nnx.Rngs(seed), 6, 16, nnx.gelu)


def _batch(t):
  rng = np.random.default_rng(100 + t)
  x = rng.standard_normal((32, 6)).astype(np.float32)
  y = np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)
  if t == SPIKE:
    y = y * 50.0  # bad labels: a gradient spike
  return jnp.asarray(x), jnp.asarray(y)


def _nnx_step(traces):
  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, x, y):
    traces.append(1)

    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value=loss)
    return loss, grads, optax_zclip.stats(optimizer)

  return train_step


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_nnx_jit_with_model_and_optimizer_donated(name):
  model = _model(0)
  optimizer = nnx.Optimizer(model, with_adamw(name), wrt=nnx.Param)
  traces = []
  train_step = _nnx_step(traces)
  ref = wrapper_reference(name)
  for t in range(STEPS):
    old = jax.tree.leaves((nnx.state(model),
                           chain_state(name, optimizer.opt_state)[1]))
    loss, grads, logged = train_step(model, optimizer, *_batch(t))
    assert all(x.is_deleted() for x in old)
    norm64 = tree_norm64(jax.tree.leaves(grads))
    np.testing.assert_allclose(grad_norm(name, logged), norm64, rtol=1e-5)
    if ref is not None:
      skip = ref.step(norm64, float(loss))["skip"]
      assert int(logged["skip/skipped"]) == skip, t
      assert skip or t != SPIKE
  assert len(traces) == 1
  # The transform before AdamW saw every step but the skipped ones.
  assert int(counted_steps(name, logged)) == STEPS - (ref.skips if ref else 0)


def _split_run(name, save_at, directory):
  """A donated nnx run, checkpointed at ``save_at`` and resumed from it."""
  model = _model(0)
  optimizer = nnx.Optimizer(model, with_adamw(name), wrt=nnx.Param)
  train_step = _nnx_step([])
  with ocp.StandardCheckpointer() as ckptr:
    for t in range(STEPS):
      if t == save_at:
        ckptr.save(directory, {"model": nnx.state(model),
                               "optimizer": nnx.state(optimizer)})
        # The next step donates these buffers: the save must have read them.
        ckptr.wait_until_finished()
      train_step(model, optimizer, *_batch(t))
    uninterrupted = nnx.state((model, optimizer))

    # A new process would build the model and optimizer afresh and restore
    # into their abstract state.
    model = _model(123)
    optimizer = nnx.Optimizer(model, with_adamw(name), wrt=nnx.Param)
    target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = ckptr.restore(directory, abstract)
  nnx.update(model, restored["model"])
  nnx.update(optimizer, restored["optimizer"])
  for t in range(save_at, STEPS):
    train_step(model, optimizer, *_batch(t))
  return uninterrupted, nnx.state((model, optimizer))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_orbax_restore_of_a_donated_state_continues_bit_identically(
    name, tmp_path):
  uninterrupted, resumed = _split_run(name, save_at=SPIKE - 2,
                                      directory=tmp_path / "ckpt")
  _assert_bits_equal(resumed, uninterrupted)


def test_nnx_optimizer_update_passes_the_loss():
  model = _MLP(nnx.Rngs(0))
  tx = _skip_tx(8, 4.0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, value=loss)
    return loss, grads, optax_zclip.stats(optimizer)

  rng = np.random.default_rng(0)
  ref = SkipSpikesRef(window=8, sigma=4.0)
  for t in range(24):
    x = rng.standard_normal((16, 4)).astype(np.float32)
    y = np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)
    if t == 15:
      y = y * 40.0  # bad labels: a loss and gradient spike
    loss, grads, s = train_step(model, optimizer, x, y)
    want = ref.step(tree_norm64(jax.tree.leaves(grads)), float(loss))
    assert int(s["skip/skipped"]) == want["skip"], t
    np.testing.assert_allclose(s["skip/grad_norm"],
                               tree_norm64(jax.tree.leaves(grads)),
                               rtol=1e-5)
    assert want["skip"] or t != 15
  # ZClip saw only the kept steps.
  assert int(s["zclip/count"]) == 24 - ref.skips
  outside = optax_zclip.stats(nnx.state(optimizer))
  assert set(outside) == set(s)


# --------------------------------------------------------------------------
# stats() of an nnx.Optimizer and of its nnx.state.


def test_stats_of_a_flax_nnx_optimizer():
  model = _MLP(nnx.Rngs(0))
  tx = optax.chain(optax_zclip.zclip(warmup_steps=3, max_grad_norm=None),
                   optax.sgd(1e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      return jnp.mean((model(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads, optax_zclip.stats(optimizer)

  rng = np.random.default_rng(0)
  ref = ZClipRef(warmup_steps=3, max_grad_norm=None)
  for t in range(12):
    x = rng.standard_normal((16, 4)).astype(np.float32)
    y = rng.standard_normal((16, 1)).astype(np.float32) * (30 if t == 9 else 1)
    _, grads, s = train_step(model, optimizer, x, y)
    leaves = jax.tree.leaves(grads)
    scale = ref.step(tree_norm64(leaves))["scale"]
  assert ref.spikes >= 1
  _check_against_reference(s, ref, leaves, scale)
  # The same numbers from the optimizer's state as `nnx.state` splits it.
  outside = optax_zclip.stats(nnx.state(optimizer))
  for k in KEYS:
    np.testing.assert_array_equal(outside[k], s[k])


def test_stats_of_adagc_and_autoclip_in_an_nnx_optimizer():
  model = _MLP(nnx.Rngs(1))
  tx = optax.chain(optax_zclip.adagc(warmup_steps=3),
                   optax_zclip.autoclip(percentile=50.0, window=4),
                   optax.sgd(1e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return grads, optax_zclip.stats(optimizer)

  rng = np.random.default_rng(0)
  for _ in range(6):
    x = rng.standard_normal((16, 4)).astype(np.float32)
    grads, s = train_step(model, optimizer, x, np.zeros((16, 1), np.float32))
  adagc_keys = {"count", "grad_norm", "clipped_norm", "num_clipped",
                "nonfinite_count", "capped", "cap_count"}
  autoclip_keys = {"count", "grad_norm", "clipped_norm", "threshold",
                   "nonfinite_count"}
  assert set(s) == ({"adagc/" + k for k in adagc_keys}
                    | {"autoclip/" + k for k in autoclip_keys})
  g = tree_norm64(jax.tree.leaves(grads))
  np.testing.assert_allclose(s["adagc/grad_norm"], g, rtol=1e-5)
  # AutoClip sees what AdaGC let through.
  np.testing.assert_allclose(s["autoclip/grad_norm"],
                             s["adagc/clipped_norm"], rtol=1e-5)
  assert int(s["adagc/count"]) == 6
  outside = optax_zclip.stats(nnx.state(optimizer))
  assert set(outside) == set(s)


def test_repeated_kind_keys_do_not_depend_on_how_nnx_state_is_passed():
  model = _MLP(nnx.Rngs(2))
  tx = optax.chain(optax_zclip.zclip(), optax_zclip.zclip(), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  a, b = optax_zclip.stats(optimizer), optax_zclip.stats(nnx.state(optimizer))
  assert set(a) == set(b) and len(a) == 2 * len(KEYS)
  assert "zclip[opt_state.0]/grad_norm" in a, sorted(a)


def _two_leaf_optimizer(tx):
  model = nnx.Module()
  model.a = nnx.Param(jnp.zeros(3))
  model.b = nnx.Param(jnp.zeros((2, 2)))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@pytest.mark.parametrize("kind", ["nnx", "nnx_state"])
@pytest.mark.parametrize("name", DECLARED)
def test_every_declared_state_is_found_in_an_nnx_optimizer(name, kind):
  grads = nesting_grads()
  model, optimizer = _two_leaf_optimizer(
      optax.chain(make_declared(name), optax.adamw(1e-3)))
  for g in grads:
    optimizer.update(model, {"a": nnx.Param(jnp.asarray(g["a"])),
                             "b": nnx.Param(jnp.asarray(g["b"]))})
  s = optax_zclip.stats(optimizer if kind == "nnx" else nnx.state(optimizer))
  check_found(s, name, grads[-1], 4)


@pytest.mark.parametrize("name", CLIPPERS)
def test_keys_read_from_an_nnx_optimizer_are_those_of_the_chain(name):
  make, kind = TRANSFORMS[name].make, KINDS[name]
  for wrapped in (False, True):
    tx = optax.chain(make(), optax.adamw(1e-3))
    tx = optax_zclip.skip_spikes(tx, window=4) if wrapped else tx
    _, optimizer = _two_leaf_optimizer(tx)
    want = _KEYS[kind] | (SKIP_KEYS if wrapped else set())
    assert set(optax_zclip.stats(optimizer)) == want, wrapped
    assert set(optax_zclip.stats(nnx.state(optimizer))) == want, wrapped


def test_the_fields_of_a_zclip_state_as_nnx_state_renders_them_are_found():
  model = nnx.Module()
  model.w = nnx.Param(jnp.zeros(2))
  optimizer = nnx.Optimizer(model, optax_zclip.zclip(), wrt=nnx.Param)
  assert set(optax_zclip.stats(nnx.state(optimizer))) == KEYS


def test_a_loss_passed_as_loss_to_an_nnx_optimizer_is_refused():
  # MaxText's and Levanter's name for it; skip_spikes reads `value`.
  model = _MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _skip_tx(8, 4.0), wrt=nnx.Param)

  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads, loss=loss)
    return loss

  x, y = jnp.ones((4, 4)), jnp.zeros((4, 1))
  with pytest.raises(TypeError, match=r"`loss=` but no `value=`.*"
                     r"optimizer.update\(model, grads, value=loss\)"):
    train_step(model, optimizer, x, y)


def test_stats_of_a_model_is_a_type_error_of_a_plain_optimizer_empty():
  model = _MLP(nnx.Rngs(0))
  for wrong in (model, nnx.state(model), nnx.state(model, nnx.Param)):
    with pytest.raises(TypeError, match="holds no optimizer state"):
      optax_zclip.stats(wrong)
  with pytest.raises(TypeError, match=r"a model \(an nnx.Module\)"):
    optax_zclip.stats(model)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  for right in (optimizer, nnx.state(optimizer), optimizer.opt_state):
    assert optax_zclip.stats(right) == {}


def test_an_nnx_update_without_the_loss_warns_once_per_trace():
  # `optimizer.update(model, grads)` hands skip_spikes no loss: its loss test
  # is off, and it says so once per trace (not per step), naming the call
  # that passes it; `value=None` asks for the norm test alone, silently.
  model = _MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _skip_tx(8, 4.0), wrt=nnx.Param)

  def make_step(**extra):
    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer, x, y):
      loss, grads = nnx.value_and_grad(
          lambda m: jnp.mean((m(x) - y) ** 2))(model)
      optimizer.update(model, grads, **extra)
      return loss

    return train_step

  x, y = jnp.ones((4, 4)), jnp.zeros((4, 1))
  with pytest.warns(optax_zclip.SkipSpikesNoLossWarning,
                    match=r"optimizer.update\(model, grads, value=loss\)"
                    ) as record:
    step = make_step()
    for _ in range(3):
      step(model, optimizer, x, y)
  assert len(record) == 1, [str(w.message) for w in record]
  step = make_step(value=None)
  for _ in range(3):
    step(model, optimizer, x, y)
  assert int(optimizer.opt_state.size[...]) == 6
