"""Step-by-step parity of `zclip` with a float64 copy of the reference rule."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import SEQ, ZClipRef, tree_norm64

import optax_zclip

MODES = [("zscore", "adaptive_scaling"), ("zscore", "mean"),
         ("zscore", "max"), ("percentile", "adaptive_scaling")]
CONFIGS = [
    dict(mode=m, clip_option=o, max_grad_norm=mgn, skip_update_on_spike=skip,
         warmup_steps=w)
    for (m, o), mgn, skip, w in itertools.product(
        MODES, [None, 1.0, 2.2], [False, True], [1, 5, 25])
] + [
    dict(clip_option="adaptive_scaling", clip_factor=cf, max_grad_norm=mgn,
         warmup_steps=w, alpha=a, z_thresh=zt)
    for cf, mgn, w, a, zt in [(0.7, None, 10, 0.9, 2.0), (1.6, None, 10, 0.97,
                                                         2.5),
                              (0.5, 2.2, 3, 0.99, 1.5), (1.3, 2.2, 25, 0.95,
                                                         3.0)]
]


def _id(cfg):
  return ",".join(f"{k}={v}" for k, v in cfg.items())


def run_both(cfg, seq):
  tx = optax_zclip.zclip(**cfg)
  ref = ZClipRef(**cfg)
  update = jax.jit(tx.update)
  state = tx.init(seq[0])
  rows = []
  for grads in seq:
    out, state = update(grads, state)
    r = ref.step(tree_norm64(grads.values()))
    r["cap_count"] = ref.cap_count
    rows.append((grads, out, state, r, ref.running_stats(), ref.spikes))
  return rows


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_matches_reference_step_by_step(cfg):
  for t, (grads, out, state, r, (mean, var), spikes) in enumerate(
      run_both(cfg, SEQ)):
    # The scale applied, leaf by leaf.
    for k in grads:
      np.testing.assert_allclose(
          np.asarray(out[k], np.float64), grads[k] * r["scale"], rtol=1e-4,
          atol=1e-7, err_msg=f"step {t} leaf {k}")
    got_scale = (tree_norm64(out.values()) / tree_norm64(grads.values()))
    assert abs(got_scale / r["scale"] - 1) <= 1e-4, (t, got_scale, r)
    assert abs(float(state.mean) - mean) <= 1e-4 * abs(mean), (t, mean)
    assert abs(float(state.var) - var) <= 1e-3 * var + 1e-9, (t, var)
    assert int(state.spike_count) == spikes, t
    # Which rule clipped: the cap, or the z-score rule (a spike it did not
    # override).
    assert int(state.capped) == r["capped"], (t, r)
    assert int(state.cap_count) == r["cap_count"], t
    assert int(state.count) == t + 1
    assert state.mean.dtype == jnp.float32 and state.var.dtype == jnp.float32


def test_sequence_is_well_posed():
  # The spikes must be detected and clipping must happen in the default
  # config, and no decision may sit on a float32 knife edge, or the parity
  # test above would prove little (or flake).
  rows = run_both({}, SEQ)
  decisions = [r for *_, r, _, _ in rows]
  assert sum(d["spike"] for d in decisions) >= 4
  assert sum(d["scale"] < 1 for d in decisions) >= 8
  for d in decisions:
    if not d["warmup"]:
      assert abs(d["z"] - 2.5) > 1e-3


def test_hand_worked_sequence():
  # warmup_steps=2, alpha=0.5, z_thresh=1, no cap.
  # Warm-up norms 1 and 3: mean 2, population var 1 (std 1).
  # Norm 2.5: z = 0.5 / (1 + eps), no spike; mean = 2.25,
  #   var = 0.5 * 1 + 0.5 * (2.5 - 2.25)**2 = 0.53125.
  # Norm 10: std = sqrt(0.53125), z = 7.75 / std > 1, a spike:
  #   c = 2.25 + std / z; updates scaled by c / (10 + eps).
  eps = 1e-6
  tx = optax_zclip.zclip(alpha=0.5, z_thresh=1.0, max_grad_norm=None,
                         warmup_steps=2, eps=eps)
  state = tx.init(None)
  for g in [1.0, 3.0, 2.5]:
    out, state = tx.update(jnp.array([g]), state)
    np.testing.assert_allclose(out, [g])
  np.testing.assert_allclose(state.mean, 2.25, rtol=1e-6)
  np.testing.assert_allclose(state.var, 0.53125, rtol=1e-6)
  std = 0.53125 ** 0.5
  z = 7.75 / (std + eps)
  c = 2.25 + std / z
  out, state = tx.update(jnp.array([10.0]), state)
  np.testing.assert_allclose(out, [10.0 * c / (10.0 + eps)], rtol=1e-6)
  np.testing.assert_allclose(state.z_score, z, rtol=1e-6)
  np.testing.assert_allclose(state.clipped_norm, c, rtol=1e-6)
  np.testing.assert_allclose(state.threshold, 2.25 + (std + eps), rtol=1e-6)
  assert int(state.spike_count) == 1
  # The statistics are fed the clip value c, not the raw norm.
  new_mean = 0.5 * 2.25 + 0.5 * c
  np.testing.assert_allclose(state.mean, new_mean, rtol=1e-6)
  np.testing.assert_allclose(
      state.var, 0.5 * 0.53125 + 0.5 * (c - new_mean) ** 2, rtol=1e-5)


def test_warmup_statistics_are_running_mean_and_population_variance():
  norms = [0.5, 2.0, 1.25, 4.0, 0.75, 3.0]
  tx = optax_zclip.zclip(warmup_steps=len(norms), max_grad_norm=None)
  state = tx.init(None)
  for i, g in enumerate(norms):
    _, state = tx.update([jnp.array(g)], state)
    seen = np.asarray(norms[: i + 1], np.float64)
    np.testing.assert_allclose(state.mean, seen.mean(), rtol=1e-6)
    np.testing.assert_allclose(state.var, seen.var(), rtol=1e-5, atol=1e-7)
    assert float(state.z_score) == 0.0
    assert float(state.threshold) == np.inf


def test_max_grad_norm_caps_during_warmup_and_after():
  tx = optax_zclip.zclip(warmup_steps=3, max_grad_norm=0.5)
  state = tx.init(None)
  for g in [2.0, 2.0, 2.0, 2.0, 2.0]:
    out, state = tx.update(jnp.array([g, 0.0]), state)
    np.testing.assert_allclose(out, [0.5 * 2.0 / (2.0 + 1e-6), 0.0],
                               rtol=1e-6)
  # Constant norms: var stays 0, no spike, and the statistics saw the raw
  # (uncapped) norm 2.
  assert float(state.var) == 0.0 and int(state.spike_count) == 0
  np.testing.assert_allclose(state.mean, 2.0, rtol=1e-6)
