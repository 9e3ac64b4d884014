"""One of two JAX processes ("hosts") for `test_multihost.py`.

  python multihost_worker.py PROCESS_ID PORT OUT_DIR

Each process has 4 CPU devices (``XLA_FLAGS`` from the parent); together they
form one 8-device mesh over which the test gradients are sharded. The process
runs ZClip under sharded `jax.jit` and under `jax.shard_map` with
``axis_name``, and writes what it saw (the replicated state and the gathered
updates, every step) to ``OUT_DIR/process_<id>.npz``.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import meshes
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from meshes import LEAVES, SHARD_MAP
from references import make_sequence

import optax_zclip

SEQ = make_sequence(steps=55, seed=5, shapes=LEAVES)  # spikes at 6, 31, 50
CFG = dict(warmup_steps=10, max_grad_norm=2.2)
LAYOUT = SHARD_MAP["1d"]  # over both processes' devices
SPECS = LAYOUT.specs


def _global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  # Every process holds the whole host array and contributes its own slices.
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def main(process_id: int, port: int, out_dir: pathlib.Path) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}", num_processes=2,
      process_id=process_id, initialization_timeout=120)
  assert jax.process_count() == 2 and jax.device_count() == meshes.DEVICES
  assert jax.local_device_count() == meshes.DEVICES // 2

  mesh = LAYOUT.mesh()
  shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  replicated = NamedSharding(mesh, P())

  runs = {
      "jit": (optax_zclip.zclip(**CFG), lambda tx: jax.jit(tx.update)),
      "shard_map": (
          optax_zclip.zclip(**CFG, axis_name=LAYOUT.axis_name),
          lambda tx: jax.jit(meshes.shard_map(
              tx.update, mesh=mesh, in_specs=(SPECS, P()),
              out_specs=(SPECS, P())))),
  }
  record = {}
  for name, (tx, make_step) in runs.items():
    step = make_step(tx)
    state = jax.tree.map(lambda x: _global(x, replicated), tx.init(None))
    for t, grads in enumerate(SEQ):
      g = {k: _global(v, shardings[k]) for k, v in grads.items()}
      out, state = step(g, state)
      for k, v in out.items():
        # This process's slices of the output, in place; the test puts the
        # two processes' together. (No collective: JAX's process_allgather
        # fails under gloo on the jaxlib floor, and it is not under test.)
        part = np.zeros(v.shape, v.dtype)
        have = np.zeros(v.shape, bool)
        for shard in v.addressable_shards:
          part[shard.index] = np.asarray(shard.data)
          have[shard.index] = True
        record[f"{name}/out/{t}/{k}"] = part
        record[f"{name}/has/{t}/{k}"] = have
      for f in optax_zclip.ZClipState._fields:
        # Replicated: this process's first shard is the whole value.
        record[f"{name}/state/{t}/{f}"] = np.asarray(
            getattr(state, f).addressable_data(0))
  np.savez(out_dir / f"process_{process_id}.npz", **record)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))
