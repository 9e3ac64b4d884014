"""Checkpoint and resume with Orbax: nothing lost across a restart.

Each case of `checkpoint_worker.CASES` (every entry of the registry,
transforms.py, saved after its warm-up and, if it has one, in its middle;
AutoClip's ring buffer wrapped on both sides of the save) is trained here in
one go, one run per entry, with a checkpoint of params and the whole
optimizer state of ``chain(<clip>, adamw)`` (wrapped, for a wrapper) written
at each case's ``save_at``. A fresh Python
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
from references import tree_norm64
from transforms import TRANSFORMS, WRAPPERS, chain_state, wrapper_reference

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
    for name in TRANSFORMS:
      cases = {case: c for case, c in cw.CASES.items() if c.name == name}
      tx = cw.make_tx(name)
      step = cw.make_step(name)
      params = cw.make_params()
      opt_state = tx.init(params)
      history, saved = [], {}  # the whole state after every step
      for t in range(cw.STEPS):
        for case, c in cases.items():
          if t == c.save_at:
            saved[case] = {"params": params, "opt_state": opt_state}
            ckptr.save((ckpt_root / case).absolute(), saved[case])
        params, opt_state = step(params, opt_state, cw.grads_at(t))
        history.append(opt_state)
      ckptr.wait_until_finished()
      for case in cases:
        ours[case] = dict(saved=saved[case], history=history,
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
  c = cw.CASES[case]

  def steps_seen(opt_state):  # by the transform: a wrapper's skips are not
    skipped = int(opt_state.skip_count) if c.name in WRAPPERS else 0
    seen = int(chain_state(c.name, opt_state)[0].count)
    return seen + skipped

  assert steps_seen(saved["opt_state"]) == c.save_at
  assert steps_seen(end["opt_state"]) == c.steps
  for k in saved["params"]:
    assert not np.array_equal(np.asarray(saved["params"][k]),
                              np.asarray(end["params"][k]))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_the_runs_match_the_float64_reference(runs, name):
  # Every step of the uninterrupted run (a wrapper's skipped steps never
  # reach the transform it wraps), and the rule acted on both sides of
  # each save, so that the restored state decided.
  e = TRANSFORMS[name]
  ref, skip_ref = e.reference(), wrapper_reference(name)
  keys = sorted(cw.DTYPES)  # jax.tree.leaves order of a dict
  history = runs[0][f"{name}_after"]["history"]
  clipped_at = []
  for t in range(cw.STEPS):
    g64 = _grads64(t)
    leaves = [g64[k] for k in keys]
    state = history[t]
    if skip_ref is not None:
      skip = skip_ref.step(tree_norm64(leaves))["skip"]
      assert int(state.skipped) == skip, t
      if skip:
        continue
    s = chain_state(name, state)[0]
    scales = ref.step(leaves)
    np.testing.assert_allclose(float(s.grad_norm), tree_norm64(leaves),
                               rtol=1e-5, err_msg=t)
    np.testing.assert_allclose(
        float(s.clipped_norm),
        tree_norm64([x * f for x, f in zip(leaves, scales, strict=True)]),
        rtol=1e-4, err_msg=t)
    assert int(s.count) == ref.count, t
    if min(scales) < 1:
      clipped_at.append(t)
    _assert_own_state(e.kind, s, ref.model, t)
  if skip_ref is not None:
    assert skip_ref.skips >= 2
  if not e.clips:
    assert not clipped_at
    return
  for case, c in cw.CASES.items():
    if c.name == name:
      assert max(clipped_at) >= c.save_at, case
      if c.save_at > e.warmup:
        assert min(clipped_at) < c.save_at, case


def _assert_own_state(kind, s, model, t):
  """The statistics of each kind's state, against its reference's."""
  if kind == "zclip":
    assert int(s.spike_count) == model.spikes, t
    mean, var = model.running_stats()
    np.testing.assert_allclose(float(s.mean), mean, rtol=1e-5, err_msg=t)
    np.testing.assert_allclose(float(s.var), var, rtol=1e-3, atol=1e-6,
                               err_msg=t)
  elif kind == "adagc":
    for i, k in enumerate(sorted(cw.DTYPES)):
      np.testing.assert_allclose(float(s.gamma[k]), model.gamma[i],
                                 rtol=1e-5, err_msg=f"{k} at {t}")
    assert int(s.num_clipped) == sum(model.clipped), t
  elif kind == "autoclip":
    thr = float(np.percentile(model.norms[-model.window:], model.percentile))
    np.testing.assert_allclose(float(s.threshold), thr, rtol=1e-5,
                               err_msg=t)
    # The ring buffer holds the last `window` norms, slot i % window for
    # norm i.
    filled = np.asarray(s.history)[[i % model.window for i in range(
        max(0, len(model.norms) - model.window), len(model.norms))]]
    np.testing.assert_allclose(filled, model.norms[-model.window:],
                               rtol=1e-6, err_msg=t)
  elif kind == "clip":
    assert int(s.clipped_count) == model.clipped_count, t
    assert float(s.threshold) == np.float32(model.threshold), t
