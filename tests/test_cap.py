"""Which rule clipped a step: the cap `max_grad_norm`, or the adaptive rule.

`zclip` and `adagc` report it as ``<kind>/capped`` (the last step) and
``<kind>/cap_count`` (cumulative); the float64 references in references.py
decide it independently (`test_zclip_parity` and `test_adagc` check them
step by step); here, the cases a user meets.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references import SEQ, ZClipRef, tree_norm64

import optax_zclip


def _norms_near_two(n=300, seed=0):
  # A run whose usual norm (about 1.85) sits above the default cap of 1.
  rng = np.random.default_rng(seed)
  return 1.85 + 0.15 * rng.standard_normal(n)


def _run(tx, norms):
  """Feeds one-element gradients of these norms; stats() after each step."""
  params = {"w": jnp.zeros(1)}
  state = tx.init(params)

  @jax.jit
  def step(state, g):
    _, state = tx.update({"w": jnp.reshape(g, [1])}, state, params)
    return state, optax_zclip.stats(state)

  logs = []
  for g in norms:
    state, s = step(state, jnp.float32(g))
    logs.append(jax.device_get(s))
  return {k: np.array([s[k] for s in logs]) for k in logs[0]}


def test_the_cap_is_named_when_the_norms_sit_above_it():
  norms = _norms_near_two()
  assert norms.min() > 1.0
  log = _run(optax.chain(optax_zclip.zclip(), optax.sgd(0.1)), norms)
  # Every step is clipped to 1, by the cap, and the statistics see the norms
  # themselves (about 1.85), so the z-score rule almost never acts.
  np.testing.assert_allclose(log["zclip/clipped_norm"], 1.0, rtol=1e-5)
  np.testing.assert_array_equal(log["zclip/capped"], 1)
  np.testing.assert_array_equal(log["zclip/cap_count"],
                                np.arange(1, len(norms) + 1))
  np.testing.assert_array_equal(log["zclip/threshold"], 1.0)
  ref = ZClipRef()
  for g in norms:
    ref.step(float(np.float32(g)))
  assert ref.cap_count == len(norms)
  assert int(log["zclip/spike_count"][-1]) == ref.spikes < 10


def test_without_a_cap_nothing_is_capped():
  norms = _norms_near_two()
  log = _run(optax_zclip.zclip(max_grad_norm=None), norms)
  np.testing.assert_array_equal(log["zclip/capped"], 0)
  np.testing.assert_array_equal(log["zclip/cap_count"], 0)
  # The clipping left is the z-score rule's, on its spikes alone.
  clipped = log["zclip/clipped_norm"] < log["zclip/grad_norm"]
  spikes = np.diff(log["zclip/spike_count"], prepend=0) > 0
  np.testing.assert_array_equal(clipped, spikes)


def test_cap_and_rule_split_the_clipped_steps():
  # A cap between the usual norm and the spikes: the cap clips the upper
  # tail (and the warm-up), the z-score rule the spikes it pulls below it.
  cfg = dict(max_grad_norm=2.2, warmup_steps=5)
  norms = [tree_norm64(g.values()) for g in SEQ]
  log = _run(optax_zclip.zclip(**cfg), norms)
  ref = ZClipRef(**cfg)
  rows = [ref.step(float(np.float32(g))) for g in norms]
  by_cap = np.array([r["capped"] for r in rows])
  by_rule = np.array([r["spike"] and not r["capped"] for r in rows])
  assert by_cap.sum() >= 10 and by_rule.sum() >= 3
  np.testing.assert_array_equal(log["zclip/capped"], by_cap)
  clipped = log["zclip/clipped_norm"] < log["zclip/grad_norm"]
  # Every clipped step is one rule's, never both's.
  np.testing.assert_array_equal(clipped, by_cap | by_rule)
  assert not np.any(by_cap & by_rule)
  # No norm on a float32 knife edge of the cap.
  assert min(abs(g - 2.2) for g in norms) > 1e-3


def test_a_nonfinite_step_is_not_capped():
  norms = [2.0, 2.0, np.inf, 2.0, np.nan, 2.0]
  log = _run(optax_zclip.zclip(warmup_steps=2), norms)
  np.testing.assert_array_equal(log["zclip/capped"], [1, 1, 0, 1, 0, 1])
  np.testing.assert_array_equal(log["zclip/cap_count"], [1, 2, 2, 3, 3, 4])


def test_an_injected_cap_is_traced_and_still_named():
  tx = optax.inject_hyperparams(optax_zclip.zclip)(max_grad_norm=1.0,
                                                   warmup_steps=3)
  params = jnp.zeros(1)
  state = tx.init(params)
  step = jax.jit(tx.update)
  capped = []
  for t, g in enumerate([2.0, 2.0, 2.0, 2.0, 2.0, 2.0]):
    if t == 3:  # raise the cap above the norms: the cap no longer clips
      state.hyperparams["max_grad_norm"] = jnp.float32(5.0)
    _, state = step(jnp.array([g]), state, params)
    capped.append(int(optax_zclip.stats(state)["zclip/capped"]))
  assert capped == [1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("cap", [1.0, None])
def test_adagc_names_the_cap_in_its_warm_up_only(cap):
  # AdaGC's cap is a global clip of its warm-up; afterwards every clip is
  # per tensor (num_clipped), and capped is 0 whatever the norm.
  tx = optax_zclip.adagc(warmup_steps=3, max_grad_norm=cap)
  params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  capped, counts, tensors = [], [], []
  for g in [2.0, 0.5, 3.0, 2.0, 30.0, 2.0]:
    _, state = step({"a": jnp.array([g]), "b": jnp.array([g])}, state)
    capped.append(int(state.capped))
    counts.append(int(state.cap_count))
    tensors.append(int(state.num_clipped))
  if cap is None:
    assert capped == [0] * 6 and counts == [0] * 6
  else:
    # Warm-up norms 2*sqrt(2), sqrt(2)/2, 3*sqrt(2): above 1, below, above.
    assert capped == [1, 0, 1, 0, 0, 0]
    assert counts == [1, 1, 2, 2, 2, 2]
  # The spike after warm-up is the per-tensor rule's, with or without a cap.
  assert tensors[4] == 2 and capped[4] == 0
