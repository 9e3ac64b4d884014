"""One clipping decision across 8 devices: sharded jit, shard_map and pmap.

Each multi-device run of every clipping transform of the registry
(transforms.py), and of ZClip's percentile mode, must equal the
single-device run on the same gradients (updates and state, relative
difference <= 1e-4) through warm-up and spikes, and both must scale each
leaf as the float64 reference does.
"""

import dataclasses
import functools
import re

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
  assert_same_step,
  make_sequence,
  one_device_run,
  to_host,
  tree_norm64,
)
from transforms import CLIPPERS, TRANSFORMS, Entry

import optax_zclip

# 60 steps: a spike in warm-up (step 6), then spikes at 31, 32 and 50.
SEQ = make_sequence(steps=60, seed=3, shapes=SHAPES)
KEYS = sorted(SHAPES)  # jax.tree.leaves order of a dict
# The registry's clipping transforms, and ZClip's percentile mode.
CASES = {name: TRANSFORMS[name] for name in CLIPPERS}
CASES["zclip_percentile"] = dataclasses.replace(
    TRANSFORMS["zclip_no_cap"], config=dict(
        warmup_steps=10, max_grad_norm=None, mode="percentile",
        z_thresh=2.0))
assert all(isinstance(e, Entry) for e in CASES.values())


def make_tx(case, **kwargs):
  return CASES[case].make(**kwargs)


# Explicit sharding is tested where the installed JAX has it (jax.sharding.
# AxisType.Explicit); an older one has Auto axes only.
AXIS_TYPES = meshes.mesh_axis_types()



@functools.cache
def single_device_run(case):
  """The one-device run, shared by the case's multi-device tests."""
  return one_device_run(make_tx(case), SEQ)


def assert_same_run(rows, case):
  """`rows` equal the single-device run and the float64 reference."""
  single = single_device_run(case)
  ref = CASES[case].reference()
  for t, (grads, (out, state), (out1, state1)) in enumerate(
      zip(SEQ, rows, single, strict=True)):
    assert_same_step(t, out, out1, state, state1)
    scales = ref.step([grads[k] for k in KEYS])
    for k, scale in zip(KEYS, scales, strict=True):
      np.testing.assert_allclose(out[k], grads[k] * scale, rtol=1e-4,
                                 atol=1e-8, err_msg=f"step {t} leaf {k}")
    assert int(state.count) == ref.count, t
    if CASES[case].kind == "zclip":
      assert int(state.spike_count) == ref.model.spikes, t
  clipped = sum(float(s.clipped_norm) < float(s.grad_norm) * (1 - 1e-6)
                for _, s in single)
  # The run exercised the clipping (or, measuring only, never clipped).
  assert clipped >= 2 if CASES[case].clips else clipped == 0, case


@pytest.mark.parametrize("axis_type", list(AXIS_TYPES.values()),
                         ids=list(AXIS_TYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_jit_fsdp_needs_no_axis_name(case, axis_type):
  mesh = SHARDED_JIT.mesh(axis_type)
  with meshes.set_mesh(mesh):
    rows, hlo = _sharded_jit_run(case, mesh)
  assert_same_run(rows, case)
  assert "all-reduce" in hlo  # the partial squared sums
  assert "all-to-all" not in hlo
  assert_gathers_only_partial_sums(hlo)


def assert_gathers_only_partial_sums(hlo):
  """No gradient is gathered: the only all-gathers are of per-device partial
  sums, a few floats per row of a leaf, in the rescaled pass that runs only
  on a step whose float32 sum of squares overflowed (the partitioner cannot
  all-reduce its two-operand reduction, so it gathers the partials)."""
  total = sum(int(np.prod(s)) for s in SHAPES.values())
  for line in hlo.splitlines():
    if " all-gather(" not in line:
      continue
    assert "cond/branch_1_fun/reduce" in line, line
    dims = re.search(r"= f32\[([\d,]*)\]", line).group(1)
    size = int(np.prod([int(d) for d in dims.split(",") if d]))
    assert size * 16 <= total, line


def _sharded_jit_run(case, mesh):
  shardings = {k: NamedSharding(mesh, s) for k, s in SHARDED_JIT.specs.items()}
  tx = make_tx(case)
  step = jax.jit(tx.update)
  state = tx.init(SEQ[0])
  rows = []
  for grads in SEQ:
    g = jax.device_put(grads, shardings)
    out, state = step(g, state)
    for k in g:
      # The update keeps the gradients' layout: nothing gathered.
      assert out[k].sharding.is_equivalent_to(g[k].sharding, g[k].ndim), k
    for x in jax.tree.leaves(state):
      assert x.sharding.is_fully_replicated, x.sharding
      assert len(x.sharding.device_set) == 8
    rows.append(to_host((out, state)))
  return rows, step.lower(g, state).compile().as_text()


def test_sharded_jit_in_a_chain_keeps_params_and_optimizer_state_sharded():
  mesh = meshes.mesh(np.asarray(jax.devices()), ("fsdp",))
  specs = {"emb": P("fsdp"), "w": P("fsdp"), "b": P("fsdp"),
           "conv": P(None, "fsdp")}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  tx = optax.chain(make_tx("zclip"), optax.adamw(1e-2))
  params = jax.device_put({k: jnp.ones(s) for k, s in SHAPES.items()},
                          shardings)
  state = jax.jit(tx.init)(params)

  @jax.jit
  def train_step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  p1 = {k: jnp.ones(s) for k, s in SHAPES.items()}
  s1 = tx.init(p1)
  step1 = jax.jit(train_step.__wrapped__)
  for grads in SEQ:
    params, state = train_step(params, state, jax.device_put(grads, shardings))
    p1, s1 = step1(p1, s1, grads)
  for k in params:
    assert params[k].sharding.is_equivalent_to(shardings[k], params[k].ndim)
    np.testing.assert_allclose(params[k], p1[k], rtol=1e-4, atol=1e-6)
  mu = state[1][0].mu
  for k in mu:
    assert mu[k].sharding.is_equivalent_to(shardings[k], mu[k].ndim)
  a, b = optax_zclip.stats(state), optax_zclip.stats(s1)
  assert int(a["zclip/spike_count"]) == int(b["zclip/spike_count"]) >= 2
  np.testing.assert_allclose(a["zclip/mean"], b["zclip/mean"], rtol=1e-4)


@pytest.mark.parametrize("layout", list(SHARD_MAP))
@pytest.mark.parametrize("case", list(CASES))
def test_shard_map_with_sharded_grads_and_axis_name(case, layout):
  mesh, specs = SHARD_MAP[layout].mesh(), SHARD_MAP[layout].specs
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  tx = make_tx(case, axis_name=SHARD_MAP[layout].axis_name)
  step = jax.jit(meshes.shard_map(tx.update, mesh=mesh,
                                  in_specs=(specs, P()),
                                  out_specs=(specs, P())))
  state = jax.device_put(tx.init(SEQ[0]), NamedSharding(mesh, P()))
  rows = []
  for grads in SEQ:
    out, state = step(jax.device_put(grads, shardings), state)
    rows.append(to_host((out, state)))
  assert_same_run(rows, case)


def test_shard_map_without_axis_name_sees_only_the_local_slice():
  # The failure `axis_name` exists to prevent: each device clips its own
  # slice by its own norm, and the decisions differ from one device.
  mesh = SHARD_MAP["1d"].mesh()
  specs = {k: P("data") for k in ("emb", "w", "b")}
  grads = {k: SEQ[40][k] for k in specs}
  cap = tree_norm64(grads.values()) / 10
  tx = optax_zclip.zclip(warmup_steps=1, max_grad_norm=cap)
  step = jax.jit(meshes.shard_map(
      tx.update, mesh=mesh, in_specs=(specs, P()),
      out_specs=(specs, P()), check_vma=False))
  out, _ = step(jax.device_put(
      grads, {k: NamedSharding(mesh, s) for k, s in specs.items()}),
      tx.init(None))
  clipped = tree_norm64([np.asarray(v) for v in out.values()])
  # Not `cap`: each of the 8 slices was scaled to norm `cap` on its own.
  np.testing.assert_allclose(clipped, np.sqrt(8) * cap, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_pmap_with_sharded_grads_and_axis_name(case):
  tx = make_tx(case, axis_name="devices")
  step = jax.pmap(tx.update, axis_name="devices", in_axes=(0, None))
  state = tx.init(SEQ[0])
  rows = []
  for grads in SEQ:
    sliced = {k: v.reshape(8, -1) for k, v in grads.items()}
    out, states = step(sliced, state)
    states = to_host(states)
    for per_device in jax.tree.leaves(states):
      assert (per_device == per_device[0]).all()  # one decision
    state = jax.tree.map(lambda x: x[0], states)
    out = {k: np.asarray(v).reshape(grads[k].shape) for k, v in out.items()}
    rows.append((out, state))
  assert_same_run(rows, case)
