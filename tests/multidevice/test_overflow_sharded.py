"""Norms that overflow float32, on 8 devices.

A finite gradient whose float32 sum of squares overflows has its norm
recomputed after rescaling, in a `jax.lax.cond` branch whose predicate is the
sum of squares after the ``psum``, so that every device takes the same branch
(its ``psum`` inside would otherwise wait forever). The sequence here puts the
overflow where that matters: in one device's slice only, and in no device's
slice but in their sum; then a NaN in one device's slice next to a huge one
in another's. Every multi-device run (`shard_map` and `pmap` with
``axis_name``, sharded `jax.jit` without) must equal the single-device run,
updates and state (1e-4 relative, as in test_sharded.py), and that run's
norms are the float64 norms (1e-5).
"""

import functools
import math

import jax
import meshes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from meshes import LEAVES as SHAPES
from meshes import SHARD_MAP
from references import (
  assert_same_step,
  make_sequence,
  one_device_run,
  to_host,
  tree_norm64,
)
from transforms import CLIPPERS, TRANSFORMS

# Each leaf split in 8 along one axis; device i holds the i-th slice (for
# "emb", rows 4i to 4i + 3), as `pmap` gets it from `reshape(8, -1)` once
# that axis is moved first.
LAYOUT = SHARD_MAP["1d"]
SPECS = LAYOUT.specs
AXES = {"emb": 0, "w": 0, "b": 0, "conv": 1}
ONE_SLICE_AT, ONLY_THE_SUM_AT, NAN_AT = 8, 11, 14
F32_MAX = float(np.finfo(np.float32).max)
# Every clipping transform of the registry (transforms.py).
CASES = {name: TRANSFORMS[name].make for name in CLIPPERS}


def _slices(x, axis):
  return np.split(np.asarray(x, np.float64), 8, axis=axis)


def _sequence():
  seq = make_sequence(steps=18, seed=3, shapes=SHAPES)
  # Device 0's rows of "emb" only.
  emb = seq[ONE_SLICE_AT]["emb"].copy()
  emb[:4] *= np.float32(1e20)
  seq[ONE_SLICE_AT] = dict(seq[ONE_SLICE_AT], emb=emb)
  # Global norm 2.5e19: squared, 6.25e38 > float32's max 3.4e38, while each
  # device's share of it is about an eighth.
  tree = seq[ONLY_THE_SUM_AT]
  f = 2.5e19 / tree_norm64(tree.values())
  seq[ONLY_THE_SUM_AT] = {k: (v.astype(np.float64) * f).astype(np.float32)
                          for k, v in tree.items()}
  # A NaN in device 7's rows next to device 0's huge ones.
  emb = seq[ONE_SLICE_AT]["emb"].copy()
  emb[-1, 0] = np.nan
  seq[NAN_AT] = dict(seq[NAN_AT], emb=emb)
  return seq


SEQ = _sequence()


def test_the_sequence_overflows_where_it_says():
  def local_sq(tree, device, keys=SHAPES):
    return sum(np.sum(_slices(tree[k], AXES[k])[device] ** 2) for k in keys)

  one, both = SEQ[ONE_SLICE_AT], SEQ[ONLY_THE_SUM_AT]
  assert local_sq(one, 0) > F32_MAX
  assert all(local_sq(one, d) < 1e3 for d in range(1, 8))
  # Only the sum, for the global norm and for the "emb" leaf alone (AdaGC
  # sums each leaf across devices).
  for keys in (SHAPES, ["emb"]):
    assert all(local_sq(both, d, keys) < F32_MAX / 2 for d in range(8))
    assert sum(local_sq(both, d, keys) for d in range(8)) > F32_MAX



@functools.cache
def _single_device_run(case):
  """The one-device run, shared by the case's multi-device tests."""
  return one_device_run(CASES[case](), SEQ)


def _shard_map_run(case):
  mesh = LAYOUT.mesh()
  shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  tx = CASES[case](axis_name=LAYOUT.axis_name)
  step = jax.jit(meshes.shard_map(tx.update, mesh=mesh,
                                  in_specs=(SPECS, P()),
                                  out_specs=(SPECS, P())))
  state = jax.device_put(tx.init(SEQ[0]), NamedSharding(mesh, P()))
  rows = []
  for grads in SEQ:
    out, state = step(jax.device_put(grads, shardings), state)
    rows.append(to_host((out, state)))
  return rows


def _pmap_run(case):
  tx = CASES[case](axis_name="data")
  step = jax.pmap(tx.update, axis_name="data", in_axes=(0, None))
  state = tx.init(SEQ[0])
  rows = []
  for grads in SEQ:
    sliced = {k: np.moveaxis(v, AXES[k], 0).reshape(8, -1)
              for k, v in grads.items()}
    out, states = step(sliced, state)
    states = to_host(states)
    for per_device in jax.tree.leaves(states):
      # One branch and one decision on every device (NaN compares unequal).
      np.testing.assert_array_equal(per_device, np.broadcast_to(
          per_device[0], per_device.shape))
    state = jax.tree.map(lambda x: x[0], states)
    out = {k: np.moveaxis(np.asarray(v).reshape(
        np.moveaxis(grads[k], AXES[k], 0).shape), 0, AXES[k])
           for k, v in out.items()}
    rows.append((out, state))
  return rows


def _sharded_jit_run(case):
  mesh = LAYOUT.mesh()
  shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  tx = CASES[case]()
  step = jax.jit(tx.update)
  state = tx.init(SEQ[0])
  rows = []
  for grads in SEQ:
    out, state = step(jax.device_put(grads, shardings), state)
    rows.append(to_host((out, state)))
  return rows


RUNS = {"shard_map": _shard_map_run, "pmap": _pmap_run,
        "sharded_jit": _sharded_jit_run}


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("case", list(CASES))
def test_overflow_on_8_devices_equals_one_device(case, run):
  single = _single_device_run(case)
  rows = RUNS[run](case)
  for t, (grads, (out, state), (out1, state1)) in enumerate(
      zip(SEQ, rows, single, strict=True)):
    assert_same_step(t, out, out1, state, state1)
    g = float(state1.grad_norm)
    if t == NAN_AT:
      assert math.isnan(g)
    else:
      np.testing.assert_allclose(g, tree_norm64(grads.values()), rtol=1e-5,
                                 err_msg=t)
    if t in (ONE_SLICE_AT, ONLY_THE_SUM_AT) and TRANSFORMS[case].clips:
      assert float(state1.clipped_norm) < 1e-3 * g, t  # clipped
    expected_nonfinite = int(t >= NAN_AT)
    assert int(state.nonfinite_count) == expected_nonfinite, t
