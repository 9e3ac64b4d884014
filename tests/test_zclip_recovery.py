"""ZClip over long runs: a lasting level shift, and a 100k-step soak.

Runs use `jax.lax.scan` over a one-element gradient whose norm is the
series' value, so thousands of steps cost one compile. Every run is checked
step by step against the float64 transcription of the reference
(`references.ZClipRef`, which also transcribes the opt-in restart).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import ZClipRef

import optax_zclip


def _scan(tx, norms):
  """Per step: the output norm and every state field, as NumPy arrays."""

  def step(state, g):
    out, state = tx.update(g[None], state)
    return state, (jnp.abs(out[0]), state)

  _, (out, states) = jax.jit(lambda xs: jax.lax.scan(
      step, tx.init(jnp.zeros(1)), xs))(jnp.asarray(norms, jnp.float32))
  return np.asarray(out, np.float64), jax.tree.map(np.asarray, states)


def _reference(norms, **cfg):
  ref = ZClipRef(**cfg)
  rows = []
  for g in np.asarray(norms, np.float32).astype(np.float64):
    r = ref.step(float(g))
    mean, var = ref.running_stats()
    rows.append((r["scale"] * g if np.isfinite(g) else g, mean, var,
                 ref.spikes, ref.nonfinite, ref.restarts))
  return [np.asarray(c) for c in zip(*rows, strict=True)]


def _level_shift(seed=0):
  rng = np.random.default_rng(seed)
  base = np.concatenate([np.full(500, 1.0), np.full(2500, 3.0)])
  return base * (1 + 0.03 * rng.standard_normal(base.size))


def _check_against_reference(norms, states, out, **cfg):
  want_out, mean, var, spikes, nonfinite, restarts = _reference(norms, **cfg)
  np.testing.assert_array_equal(states.spike_count, spikes)
  np.testing.assert_array_equal(states.nonfinite_count, nonfinite)
  np.testing.assert_array_equal(states.restart_count, restarts)
  finite = np.isfinite(want_out)
  np.testing.assert_allclose(out[finite], want_out[finite], rtol=1e-4)
  np.testing.assert_allclose(states.mean, mean, rtol=1e-2, atol=1e-6)
  np.testing.assert_allclose(np.sqrt(states.var), np.sqrt(var), rtol=1e-2,
                             atol=1e-4)


@pytest.mark.parametrize("clip_factor", [1.0, 0.9, 0.7])
def test_restart_follows_a_lasting_level_shift(clip_factor):
  norms = _level_shift()
  cfg = dict(max_grad_norm=None, clip_factor=clip_factor,
             max_consecutive_spikes=50)
  out, states = _scan(optax_zclip.zclip(**cfg), norms)
  _check_against_reference(norms, states, out, **cfg)
  # The output norm settles at the new level: over the last 1000 steps
  # within 5% of what came in.
  np.testing.assert_allclose(out[-1000:].mean(), norms[-1000:].mean(),
                             rtol=0.05)
  assert states.restart_count[-1] >= 1
  assert states.restart_count[499] == 0  # nothing restarts before the shift


@pytest.mark.parametrize("clip_factor", [1.0, 0.9, 0.7])
def test_without_restart_the_reference_behaviour_is_kept(clip_factor):
  norms = _level_shift()
  cfg = dict(max_grad_norm=None, clip_factor=clip_factor)
  out, states = _scan(optax_zclip.zclip(**cfg), norms)
  _check_against_reference(norms, states, out, **cfg)
  assert states.restart_count[-1] == 0
  if clip_factor == 0.7:
    # The failure the option exists for: every step after the shift is a
    # spike, clipped towards a stale mean.
    assert states.spike_count[-1] - states.spike_count[499] == 2500
    assert out[-1000:].mean() < 0.5 * norms[-1000:].mean()


def _soak_series(n=100_000, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(n)
  norms = (1.0 + 0.5 * np.sin(t / 3000) + 0.3 * t / n)  # drift
  norms *= np.exp(0.05 * rng.standard_normal(n))
  spikes = rng.choice(n, 200, replace=False)
  norms[spikes] *= rng.uniform(5, 30, spikes.size)
  for start in rng.choice(n - 20, 10, replace=False):  # NaN and Inf bursts
    norms[start:start + rng.integers(1, 15)] = rng.choice([np.nan, np.inf])
  norms[60_000:] *= 3.0  # a level shift
  return norms


@pytest.mark.parametrize("cfg", [
    dict(max_grad_norm=None),
    dict(max_grad_norm=None, max_consecutive_spikes=50, clip_factor=0.8),
], ids=["default", "restart"])
def test_100k_step_soak(cfg):
  norms = _soak_series()
  out, states = _scan(optax_zclip.zclip(**cfg), norms)
  # No NaN in the statistics, the threshold or the counters; the last
  # step's own norms are NaN exactly where the gradient was.
  last_step = {"grad_norm", "clipped_norm", "z_score"}
  for name, field in states._asdict().items():
    want = np.isnan(norms) if name in last_step else np.zeros(field.shape)
    np.testing.assert_array_equal(np.isnan(field), want, err_msg=name)
  _check_against_reference(norms, states, out, **cfg)
  finite = np.isfinite(norms)
  assert states.nonfinite_count[-1] == (~finite).sum()
  if "max_consecutive_spikes" in cfg:
    assert states.restart_count[-1] >= 1  # the level shift at 60k
  else:
    assert states.count[-1] == finite.sum()
