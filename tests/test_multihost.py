"""Two JAX processes on 127.0.0.1, 4 CPU devices each, one 8-device mesh.

Both processes must reach the state and updates of a single-device run and
the float64 reference, under sharded `jax.jit` and under `jax.shard_map` with
``axis_name``. Bounded in time; both processes are always cleaned up.
"""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import meshes
import numpy as np
import pytest
from multihost_worker import CFG, SEQ
from references import ZClipRef, tree_norm64

import optax_zclip

HERE = pathlib.Path(__file__).resolve().parent
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  out = tmp_path_factory.mktemp("multihost")
  # Half the devices each: one mesh of meshes.DEVICES between them.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=meshes.xla_flags(meshes.DEVICES // 2, env={}))
  port = _free_port()
  procs = []
  logs = [open(out / f"log_{i}.txt", "w+") for i in range(2)]
  try:
    for i in range(2):
      procs.append(subprocess.Popen(
          [sys.executable, str(HERE / "multihost_worker.py"), str(i),
           str(port), str(out)],
          env=env, cwd=HERE, stdout=logs[i], stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  text = []
  for f in logs:
    f.seek(0)
    text.append(f.read()[-4000:])
    f.close()
  assert codes == [0, 0], "\n---\n".join(text)
  return [dict(np.load(out / f"process_{i}.npz")) for i in range(2)]


def _single_device_run():
  tx = optax_zclip.zclip(**CFG)
  step = jax.jit(tx.update)
  state = tx.init(None)
  rows = []
  for grads in SEQ:
    out, state = step(grads, state)
    rows.append((jax.device_get(out), jax.device_get(state)))
  return rows


@pytest.mark.parametrize("run", ["jit", "shard_map"])
def test_two_hosts_make_the_single_device_decisions(records, run):
  ref = ZClipRef(**CFG)
  for t, (grads, (out1, state1)) in enumerate(
      zip(SEQ, _single_device_run(), strict=True)):
    scale = ref.step(tree_norm64(grads.values()))["scale"]
    for k in grads:
      # Each process holds half of every sharded leaf (all of a replicated
      # one); together they hold it all.
      out = np.zeros_like(records[0][f"{run}/out/{t}/{k}"])
      covered = np.zeros(out.shape, bool)
      for rec in records:
        have = rec[f"{run}/has/{t}/{k}"]
        out = np.where(have, rec[f"{run}/out/{t}/{k}"], out)
        covered |= have
      assert covered.all(), (t, k)
      np.testing.assert_allclose(out, out1[k], rtol=1e-4, atol=1e-8)
      np.testing.assert_allclose(out, grads[k] * scale, rtol=1e-4, atol=1e-8)
    for rec in records:  # both processes
      for f in optax_zclip.ZClipState._fields:
        np.testing.assert_allclose(rec[f"{run}/state/{t}/{f}"],
                                   getattr(state1, f), rtol=1e-4, atol=1e-7,
                                   err_msg=f"step {t} field {f}")
    assert int(records[0][f"{run}/state/{t}/spike_count"]) == ref.spikes
  assert ref.spikes >= 2
