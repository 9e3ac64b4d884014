"""The multi-device tests' meshes (meshes.py) on the one device here.

The mesh helpers must run the same program on every JAX release, and every
layout must span the devices and split each leaf evenly.
"""

import jax
import jax.numpy as jnp
import meshes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P


@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_and_set_mesh_run_on_every_release(check_vma):
  mesh = meshes.mesh(np.asarray(jax.devices()[:1]), ("data",))

  def f(x):
    return jax.lax.psum(jnp.sum(x * x), "data")

  step = jax.jit(meshes.shard_map(f, mesh=mesh, in_specs=P("data"),
                                  out_specs=P(), check_vma=check_vma))
  with meshes.set_mesh(mesh):
    assert float(step(jnp.arange(4.0))) == 14.0


def test_every_mesh_axis_type_builds_a_mesh():
  kinds = meshes.mesh_axis_types()
  assert "auto" in kinds
  for kind in kinds.values():
    mesh = meshes.mesh(np.asarray(jax.devices()[:1]), ("x",), kind)
    assert mesh.axis_names == ("x",)


@pytest.mark.parametrize(
    "layout", [meshes.SHARDED_JIT, *meshes.SHARD_MAP.values()],
    ids=["sharded_jit", *meshes.SHARD_MAP])
def test_every_layout_spans_the_devices_and_splits_every_leaf_evenly(layout):
  assert int(np.prod(layout.shape)) == meshes.DEVICES
  assert set(layout.specs) == set(meshes.LEAVES)
  sizes = dict(zip(layout.names, layout.shape, strict=True))
  for leaf, spec in layout.specs.items():
    for dim, axes in zip(meshes.LEAVES[leaf], spec, strict=False):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      assert dim % int(np.prod([sizes[a] for a in axes])) == 0, (leaf, spec)


def test_xla_flags_asks_for_the_devices_once():
  flag = "--xla_force_host_platform_device_count=8"
  assert meshes.xla_flags(env={}) == flag
  assert meshes.xla_flags(env={"XLA_FLAGS": "--a"}) == f"--a {flag}"
  assert meshes.xla_flags(env={"XLA_FLAGS": flag}) == flag
  assert meshes.xla_flags(4, env={}).endswith("=4")
