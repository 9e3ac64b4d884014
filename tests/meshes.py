"""The meshes of the multi-device tests: their layouts, on every JAX release.

The layouts the tests shard over live here once: `DEVICES` simulated CPU
devices (`xla_flags` asks for them; JAX fixes the count when its backend
starts), the gradient leaves `LEAVES`, and the meshes and partition specs of
`SHARDED_JIT` and `SHARD_MAP`. So do the mesh helpers, whose API moved
between the JAX releases the package supports (0.4.36 to 0.12): `shard_map`,
`set_mesh`, `mesh_axis_types` and `mesh`. They test for the API itself,
never for a version number, and only the tests use them: the package does
not.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

# The simulated CPU devices of the multi-device tests.
DEVICES = 8


def xla_flags(devices: int = DEVICES, env=os.environ) -> str:
  """``env``'s ``XLA_FLAGS`` with ``devices`` simulated CPU devices asked
  for; to be set before JAX starts its backend."""
  flag = f"--xla_force_host_platform_device_count={devices}"
  flags = env.get("XLA_FLAGS", "")
  return flags if flag in flags.split() else f"{flags} {flag}".strip()


# The gradient leaves the multi-device tests shard: each splits in 8 along
# one axis, and in 4 x 2 along two.
LEAVES = {"emb": (32, 16), "w": (16, 8), "b": (8,), "conv": (4, 8, 2)}


class Layout(NamedTuple):
  """A mesh over the `DEVICES` devices, and how each of `LEAVES` is split.

  Attributes:
    shape: the mesh's shape.
    names: its axis names.
    axis_name: what a transform is given as ``axis_name`` under
      `shard_map` (None: under sharded `jax.jit`, where it needs none).
    specs: each leaf's `PartitionSpec`.
  """

  shape: tuple[int, ...]
  names: tuple[str, ...]
  axis_name: Any
  specs: dict[str, P]

  def mesh(self, axis_type: Any = None) -> jax.sharding.Mesh:
    """The mesh of all the devices, its axes of ``axis_type`` (see
    `mesh`)."""
    return mesh(np.asarray(jax.devices()).reshape(self.shape), self.names,
                axis_type)


# FSDP and tensor parallelism under sharded `jax.jit`: one leaf replicated,
# the rest sharded.
SHARDED_JIT = Layout((4, 2), ("fsdp", "tp"), None,
                     {"emb": P("fsdp", "tp"), "w": P("fsdp"), "b": P("tp"),
                      "conv": P()})

# Under `shard_map`: each leaf in 8 slices along one axis (device i holds
# the i-th; "conv" is split along its axis 1), and a 2-d mesh whose axes the
# transforms get as a tuple.
SHARD_MAP = {
    "1d": Layout((8,), ("data",), "data",
                 {"emb": P("data"), "w": P("data"), "b": P("data"),
                  "conv": P(None, "data")}),
    "2d_tuple_axis": Layout((4, 2), ("fsdp", "tp"), ("fsdp", "tp"),
                            {"emb": P("fsdp", "tp"), "w": P(("fsdp", "tp")),
                             "b": P(("tp", "fsdp")),
                             "conv": P("fsdp", "tp")}),
}


def shard_map(f: Callable, *, mesh: Any, in_specs: Any, out_specs: Any,
              check_vma: bool = True) -> Callable:
  """``jax.shard_map`` where JAX has it (0.6 on); before it
  ``jax.experimental.shard_map.shard_map``, whose ``check_vma`` was called
  ``check_rep`` until it was renamed."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=check_vma)
  from jax.experimental.shard_map import shard_map as old  # noqa: PLC0415
  check = ("check_vma" if "check_vma" in inspect.signature(old).parameters
           else "check_rep")
  return old(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
             **{check: check_vma})


@contextlib.contextmanager
def set_mesh(mesh: Any) -> Iterator[None]:
  """``with jax.set_mesh(mesh)`` where JAX has it (0.7.2 does, 0.7.0 does
  not); before it ``jax.sharding.use_mesh`` (0.5 to 0.7.0); before that
  the mesh itself, as a context manager (0.4.36)."""
  if hasattr(jax, "set_mesh"):
    context = jax.set_mesh(mesh)
  elif hasattr(jax.sharding, "use_mesh"):
    context = jax.sharding.use_mesh(mesh)
  else:
    context = mesh
  with context:
    yield


def mesh_axis_types() -> dict[str, Any]:
  """The kinds of mesh axis this JAX has, by lower-case name: ``auto``
  and, where it has one, ``explicit`` (explicit sharding). A release
  without ``jax.sharding.AxisType`` has one kind, what later ones call
  ``Auto``: given as None, `mesh`'s default."""
  kinds = getattr(jax.sharding, "AxisType", None)
  if kinds is None:
    return {"auto": None}
  return {name.lower(): getattr(kinds, name) for name in ("Auto", "Explicit")
          if hasattr(kinds, name)}


def mesh(devices: Any, names: tuple[str, ...],
         axis_type: Any = None) -> jax.sharding.Mesh:
  """``jax.sharding.Mesh(devices, names)`` with every axis of ``axis_type``
  (a value of `mesh_axis_types`; None: JAX's default kind)."""
  if axis_type is None:
    return jax.sharding.Mesh(devices, names)
  return jax.sharding.Mesh(devices, names,
                           axis_types=(axis_type,) * len(names))
