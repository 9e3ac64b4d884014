"""Training loops that donate the optimizer state, as real trainers do.

MaxText, Levanter and the Flax examples donate params and optimizer state to
the jitted step so that they are updated in place. That fails on the first
step ("Attempt to donate the same buffer twice") if two leaves of a state
share one buffer, so: no leaf of any state from ``init`` or ``update`` may
share a buffer with another; and every transform chained before AdamW runs
under ``jax.jit`` with donation, compiling its step once. `skip_spikes` wraps
the whole chain and is passed the loss; its decisions are checked against
its float64 reference. (The same under ``nnx.jit(donate_argnums=(0, 1))``,
with an Orbax restore of the donated state, is in ``test_nnx.py``; under
sharded jit on 8 devices in ``multidevice/test_donation_sharded.py``.) The
values are checked against float64 norms so that a donated run is known to
be right, not only to run.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from references import tree_norm64
from transforms import (
  SPIKE,
  TRANSFORMS,
  chain_state,
  grad_norm,
  grads_at,
  loss_at,
  params0,
  with_adamw,
  wrapper_reference,
)

import optax_zclip

STEPS = 14


def _buffers(tree):
  """(path, buffer address) of every non-empty array leaf of ``tree``."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(x, jax.Array) and x.size:
      for shard in x.addressable_shards:
        out.append((jax.tree_util.keystr(path),
                    shard.data.unsafe_buffer_pointer()))
  return out


def _assert_own_buffers(tree, what):
  seen = {}
  for path, ptr in _buffers(tree):
    assert ptr not in seen, f"{what}: {path} shares a buffer with {seen[ptr]}"
    seen[ptr] = path


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_no_two_leaves_of_a_state_share_a_buffer(name):
  tx = with_adamw(name)
  params = params0()
  eager = tx.init(params)
  _assert_own_buffers(eager, "init")
  _assert_own_buffers(jax.jit(tx.init)(params), "jitted init")
  _, state = tx.update(grads_at(0), eager, params, value=loss_at(0))
  _assert_own_buffers(state, "update")
  _, state = jax.jit(tx.update)(grads_at(1), state, params, value=loss_at(1))
  _assert_own_buffers(state, "jitted update")


def _make_step(tx, traces):
  def step(params, opt_state, grads, loss):
    traces.append(1)  # runs once per trace, never per call
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return (optax.apply_updates(params, updates), opt_state,
            optax_zclip.stats(opt_state))

  return jax.jit(step, donate_argnums=(0, 1))


def _undonated_run(name):
  tx = with_adamw(name)
  step = jax.jit(lambda p, s, g, x: _apply(tx, p, s, g, x))
  params = params0()
  state = tx.init(params)
  for t in range(STEPS):
    params, state = step(params, state, grads_at(t), loss_at(t))
  return params, state


def _apply(tx, params, state, grads, loss):
  updates, state = tx.update(grads, state, params, value=loss)
  return optax.apply_updates(params, updates), state


def _assert_bits_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                          jax.tree.leaves(b), strict=True):
    x, y = np.atleast_1d(x), np.atleast_1d(y)
    assert x.dtype == y.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8),
                                  err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_jax_jit_with_params_and_state_donated(name):
  tx = with_adamw(name)
  traces = []
  step = _make_step(tx, traces)
  params = params0()
  state = tx.init(params)  # a fresh state, donated on the very first step
  ref = wrapper_reference(name)
  for t in range(STEPS):
    # AdamW's moments and the params: gradient-sized, updated in place.
    old = jax.tree.leaves((params, chain_state(name, state)[1]))
    grads = grads_at(t)
    params, state, logged = step(params, state, grads, loss_at(t))
    # Donated means consumed: the old buffers are gone. (Telemetry fields
    # that the next update does not read are not inputs of the compiled
    # step, so JAX leaves them alone.)
    assert all(x.is_deleted() for x in old)
    norm64 = tree_norm64(jax.tree.leaves(grads))
    np.testing.assert_allclose(grad_norm(name, logged), norm64, rtol=1e-5)
    if ref is not None:
      skip = ref.step(norm64, float(loss_at(t)))["skip"]
      assert int(logged["skip/skipped"]) == skip, t
      assert skip or t != SPIKE
  assert len(traces) == 1 and step._cache_size() == 1
  # The same numbers as without donation (whose values the transforms' own
  # tests hold to float64 references), bit for bit.
  _assert_bits_equal((params, state), _undonated_run(name))


