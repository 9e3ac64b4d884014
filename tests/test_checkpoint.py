"""Checkpoint and resume with Orbax: nothing lost across a restart.

Each case of `checkpoint_worker.CASES` (ZClip saved during and after its
warm-up, AdaGC during and after, AutoClip with a wrapped ring buffer) is
trained here in one go, with a checkpoint of params and the whole optimizer
state of ``chain(<clip>, adamw)`` written at ``save_at``. A fresh Python
process then restores each checkpoint into an abstract target from
`jax.eval_shape` and trains on; its params and every state leaf must be
bit-identical to the uninterrupted run. The uninterrupted runs themselves are
checked against the float64 references, so that the resumed runs are known
to be right and not merely equal.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import checkpoint_worker as cw
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from references import AdaGCRef, AutoClipRef, ZClipRef, tree_norm64

TESTS = pathlib.Path(__file__).resolve().parent


def _grads64(t):
  return {k: np.asarray(v, np.float64) for k, v in cw.grads_at(t).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The uninterrupted runs, and the directory of the resumed ones."""
  root = tmp_path_factory.mktemp("checkpoint")
  ckpt_root, out_dir = root / "ckpt", root / "out"
  out_dir.mkdir()
  ours = {}
  with ocp.StandardCheckpointer() as ckptr:
    for case, c in cw.CASES.items():
      tx = cw.make_tx(case)
      step = cw.make_step(tx)
      params = cw.make_params()
      opt_state = tx.init(params)
      history = []  # the clipping state after every step
      for t in range(c.steps):
        if t == c.save_at:
          saved = {"params": params, "opt_state": opt_state}
          ckptr.save((ckpt_root / case).absolute(), saved)
        params, opt_state = step(params, opt_state, cw.grads_at(t))
        history.append(opt_state[0])
      ckptr.wait_until_finished()
      ours[case] = dict(saved=saved, history=history,
                        final={"params": params, "opt_state": opt_state})
  proc = subprocess.run(
      [sys.executable, str(TESTS / "checkpoint_worker.py"), str(ckpt_root),
       str(out_dir), *cw.CASES],
      cwd=TESTS, env=dict(os.environ), capture_output=True, text=True,
      timeout=240, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return ours, out_dir


def _leaf_bits(tree):
  return [cw.bits(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("case", list(cw.CASES))
def test_restore_in_a_fresh_process_into_an_abstract_target(runs, case):
  ours, out_dir = runs
  info = json.loads((out_dir / f"{case}.json").read_text())
  target = cw.abstract_target(case)
  expected = cw.describe(target)
  # Structure (NamedTuple states, AdaGC's gamma dict, AdamW's mu/nu), dtypes
  # (the bf16 leaf, int32 counters, float32 statistics) and shapes.
  assert info == expected
  concrete = cw.describe(ours[case]["saved"])
  assert info == concrete
  assert "bfloat16" in info["dtypes"] and "int32" in info["dtypes"]
  with np.load(out_dir / f"{case}.npz") as z:
    saved = _leaf_bits(ours[case]["saved"])
    assert len(saved) == len(info["paths"])
    for i, (path, want) in enumerate(zip(info["paths"], saved, strict=True)):
      np.testing.assert_array_equal(z[f"restored_{i}"], want, err_msg=path)


@pytest.mark.parametrize("case", list(cw.CASES))
def test_resumed_run_is_bit_identical_to_the_uninterrupted_one(runs, case):
  ours, out_dir = runs
  paths = cw.describe(ours[case]["final"])["paths"]
  final = _leaf_bits(ours[case]["final"])
  with np.load(out_dir / f"{case}.npz") as z:
    assert sum(k.startswith("final_") for k in z.files) == len(final)
    for i, (path, want) in enumerate(zip(paths, final, strict=True)):
      np.testing.assert_array_equal(z[f"final_{i}"], want, err_msg=path)
  # The checkpoint was not the initial state, and training moved on after it:
  # a restore that lost the state or the params would not match.
  saved, end = ours[case]["saved"], ours[case]["final"]
  assert int(saved["opt_state"][0].count) == cw.CASES[case].save_at
  assert int(end["opt_state"][0].count) == cw.CASES[case].steps
  for k in saved["params"]:
    assert not np.array_equal(np.asarray(saved["params"][k]),
                              np.asarray(end["params"][k]))


@pytest.mark.parametrize("case", ["zclip_warmup", "zclip_after"])
def test_zclip_runs_match_the_reference(runs, case):
  ours = runs[0][case]
  c = cw.CASES[case]
  ref = ZClipRef()
  spikes_at = []
  for t in range(c.steps):
    r = ref.step(tree_norm64(_grads64(t).values()))
    if r["spike"]:
      spikes_at.append(t)
    s = ours["history"][t]
    assert int(s.spike_count) == ref.spikes, t
    mean, var = ref.running_stats()
    np.testing.assert_allclose(float(s.mean), mean, rtol=1e-5, err_msg=t)
    np.testing.assert_allclose(float(s.var), var, rtol=1e-3, atol=1e-6,
                               err_msg=t)
    if t == c.save_at - 1 and case == "zclip_warmup":
      assert not ref.initialized  # saved in the middle of the warm-up
  # Spikes on both sides of the save, so the restored statistics decided.
  if case == "zclip_after":
    assert any(t < c.save_at for t in spikes_at)
    assert any(t >= c.save_at for t in spikes_at)
  assert spikes_at and max(spikes_at) >= c.save_at


@pytest.mark.parametrize("case", ["adagc_warmup", "adagc_after"])
def test_adagc_runs_match_the_reference(runs, case):
  ours = runs[0][case]
  c = cw.CASES[case]
  ref = AdaGCRef(warmup_steps=10)
  keys = sorted(cw.DTYPES)  # jax.tree.leaves order of a dict
  clipped_at = []
  for t in range(c.steps):
    ref.step([_grads64(t)[k] for k in keys])
    s = ours["history"][t]
    for i, k in enumerate(keys):
      np.testing.assert_allclose(float(s.gamma[k]), ref.gamma[i], rtol=1e-5,
                                 err_msg=f"{k} at {t}")
    assert int(s.num_clipped) == sum(ref.clipped), t
    assert int(s.count) == ref.steps, t
    if t >= ref.warmup_steps and any(ref.clipped):
      clipped_at.append(t)
  # The per-tensor rule clipped after the save, so the restored gammas
  # decided (and, for the save after warm-up, before it too).
  assert max(clipped_at) >= c.save_at
  if case == "adagc_after":
    assert min(clipped_at) < c.save_at


def test_autoclip_run_matches_the_reference(runs):
  ours = runs[0]["autoclip"]
  c = cw.CASES["autoclip"]
  ref = AutoClipRef(window=16)
  for t in range(c.steps):
    _, thr = ref.step(tree_norm64(_grads64(t).values()))
    s = ours["history"][t]
    np.testing.assert_allclose(float(s.threshold), thr, rtol=1e-5, err_msg=t)
  # The ring buffer holds the last 16 norms, slot t % 16 for norm t.
  want = np.empty(16)
  for t, g in enumerate(ref.norms):
    want[t % 16] = g
  np.testing.assert_allclose(np.asarray(ours["final"]["opt_state"][0].history),
                             want, rtol=1e-6)
