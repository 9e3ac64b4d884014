"""`skip_spikes` on 8 devices: the decisions of one device, everywhere.

``skip_spikes(chain(zclip(), sgd()))`` under sharded jit (FSDP, no
``axis_name``), `jax.shard_map` and `jax.pmap` (each device a slice of the
gradients, ``axis_name`` given to both transforms) must skip the steps the
float64 reference skips, and its updates and state must equal the
single-device run's, through norm and loss outliers and NaN steps.
"""

import math

import jax
import jax.numpy as jnp
import meshes
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from meshes import LEAVES as SHAPES
from meshes import SHARD_MAP, SHARDED_JIT
from references import (
  SkipSpikesRef,
  assert_same_step,
  make_sequence,
  to_host,
  tree_norm64,
)

import optax_zclip

WINDOW, SIGMA = 16, 3.0


def _run_data():
  """60 steps: norm spikes at 6 (taken), 31, 32 and 50; loss outliers; NaNs."""
  seq = make_sequence(steps=60, seed=3, shapes=SHAPES)
  rng = np.random.default_rng(1)
  losses = [float(2.5 - 0.005 * t + 0.02 * rng.standard_normal())
            for t in range(60)]
  losses[40] += 1.0
  losses[44] = math.nan
  seq[55] = {k: np.array(v) for k, v in seq[55].items()}
  seq[55]["w"][3, 2] = np.nan
  return seq, losses


SEQ, LOSSES = _run_data()


def make_tx(axis_name=None):
  inner = optax.chain(
      optax_zclip.zclip(warmup_steps=10, max_grad_norm=2.2,
                        axis_name=axis_name),
      optax.sgd(0.1))
  return optax_zclip.skip_spikes(inner, window=WINDOW, sigma=SIGMA,
                                 axis_name=axis_name)


def _update(tx):
  return lambda grads, state, loss: tx.update(grads, state, value=loss)


def single_device_run():
  tx = make_tx()
  step = jax.jit(_update(tx))
  state = tx.init(SEQ[0])
  rows = []
  for grads, loss in zip(SEQ, LOSSES, strict=True):
    out, state = step(grads, state, loss)
    rows.append(to_host((out, state)))
  return rows


def assert_same_run(rows):
  """``rows`` skip as the reference does and equal the one-device run."""
  ref = SkipSpikesRef(window=WINDOW, sigma=SIGMA)
  for t, ((out, state), (out1, state1)) in enumerate(
      zip(rows, single_device_run(), strict=True)):
    skip = ref.step(tree_norm64(SEQ[t].values()), LOSSES[t])["skip"]
    assert int(state.skipped) == int(state1.skipped) == skip, t
    assert_same_step(t, out, out1, state, state1)
  # Norm, loss and non-finite skips all happened; the early spike did not.
  assert ref.nonfinite == 2 and ref.skips >= 5
  assert not rows[6][1].skipped and rows[31][1].skipped
  assert rows[40][1].skipped


def test_sharded_jit_fsdp_needs_no_axis_name():
  mesh = SHARDED_JIT.mesh()
  shardings = {k: NamedSharding(mesh, s) for k, s in SHARDED_JIT.specs.items()}
  tx = make_tx()
  with meshes.set_mesh(mesh):
    step = jax.jit(_update(tx))
    state = tx.init(SEQ[0])
    rows = []
    for grads, loss in zip(SEQ, LOSSES, strict=True):
      g = jax.device_put(grads, shardings)
      out, state = step(g, state, loss)
      for k in g:
        assert out[k].sharding.is_equivalent_to(g[k].sharding, g[k].ndim), k
      for x in jax.tree.leaves(state):
        assert x.sharding.is_fully_replicated
      rows.append(to_host((out, state)))
  assert_same_run(rows)


@pytest.mark.parametrize("layout", list(SHARD_MAP))
def test_shard_map_with_sharded_grads_and_axis_name(layout):
  mesh, specs = SHARD_MAP[layout].mesh(), SHARD_MAP[layout].specs
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  tx = make_tx(SHARD_MAP[layout].axis_name)
  step = jax.jit(meshes.shard_map(_update(tx), mesh=mesh,
                                  in_specs=(specs, P(), P()),
                                  out_specs=(specs, P())))
  state = jax.device_put(tx.init(SEQ[0]), NamedSharding(mesh, P()))
  rows = []
  for grads, loss in zip(SEQ, LOSSES, strict=True):
    out, state = step(jax.device_put(grads, shardings), state,
                      jnp.float32(loss))
    rows.append(to_host((out, state)))
  assert_same_run(rows)


def test_pmap_with_sharded_grads_and_axis_name():
  tx = make_tx("devices")
  step = jax.pmap(_update(tx), axis_name="devices", in_axes=(0, None, None))
  state = tx.init(SEQ[0])
  rows = []
  for grads, loss in zip(SEQ, LOSSES, strict=True):
    sliced = {k: v.reshape(8, -1) for k, v in grads.items()}
    out, states = step(sliced, state, jnp.float32(loss))
    states = to_host(states)
    for per_device in jax.tree.leaves(states):
      # One decision and one state on every device (NaN equal to NaN).
      np.testing.assert_array_equal(per_device, np.broadcast_to(
          per_device[0], per_device.shape))
    state = jax.tree.map(lambda x: x[0], states)
    out = {k: np.asarray(v).reshape(grads[k].shape) for k, v in out.items()}
    rows.append((out, state))
  assert_same_run(rows)
