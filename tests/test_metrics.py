"""Loss-spike metrics against hand-built curves and a naive reference."""

from __future__ import annotations

import math

import bad_values
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from metrics_reference import exact_mask, naive_mask, naive_runs

from optax_zclip._metrics import count_spikes, spike_mask, spike_score

NAN, INF = float("nan"), float("inf")


def random_curve(rng, n, n_spikes=5, spike_scale=3.0):
  t = np.arange(n)
  losses = 2.0 + 3.0 * np.exp(-t / (n / 4 + 1))
  losses += 0.05 * rng.standard_normal(n)
  at = rng.integers(0, n, n_spikes)
  losses[at] += spike_scale * rng.uniform(0.2, 2.0, n_spikes)
  return losses


# ----------------------------------------------------------------------------
# Hand-built curves.


def test_smooth_curve_with_known_spikes():
  n = 2000
  t = np.arange(n)
  losses = 2.0 + 3.0 * np.exp(-t / 300.0)
  losses[500] += 5.0  # A single-step spike.
  losses[1000:1003] += 5.0  # A 3-step spike.
  mask = spike_mask(losses, window=200, n_sigma=7.0)
  assert mask.nonzero()[0].tolist() == [500, 1000, 1001, 1002]
  assert count_spikes(losses, window=200, n_sigma=7.0) == 2
  assert spike_score(losses, window=200, n_sigma=7.0) == 4 / n


def test_smooth_decay_has_no_spikes():
  losses = 2.0 + 3.0 * np.exp(-np.arange(5000) / 500.0)
  assert not spike_mask(losses, window=100, n_sigma=0.01).any()
  assert spike_score(losses, 100, 0.01) == 0.0
  assert count_spikes(losses, 100, 0.01) == 0


def test_doc_example_by_hand():
  losses = [3.0, 2.9, 2.8, 2.7, 9.0, 2.6, 2.5, 2.4]
  # Step 4: mean 2.85, pstdev sqrt(0.0125) ~ 0.112, threshold ~ 3.19.
  m = 2.85
  s = math.sqrt(sum((u - m) ** 2 for u in losses[:4]) / 4)
  assert 9.0 > m + 3 * s
  assert spike_mask(losses, 4, 3.0).tolist() == [False] * 4 + [True] + [
      False] * 3
  assert spike_score(losses, 4, 3.0) == 1 / 8
  assert count_spikes(losses, 4, 3.0) == 1


def test_first_two_steps_never_flagged():
  # Step 1 is 100x step 0, but has a single earlier value.
  losses = [0.0, 100.0, 1000.0, 1.0]
  # Step 2: mean 50, pstdev 50, threshold 50 + 7 * 50 = 400 < 1000.
  assert spike_mask(losses, window=2, n_sigma=7.0).tolist() == [
      False, False, True, False]
  assert not spike_mask([1.0, 1e9], window=5, n_sigma=1.0).any()
  assert not spike_mask([5.0], window=5, n_sigma=1.0).any()


def test_window_uses_only_the_last_window_steps():
  # With window 3, step 5 sees [1, 1, 1] (flat), so 1.5 is a spike; with
  # window 5 it also sees the 0 and 4, whose spread hides it.
  losses = [0.0, 4.0, 1.0, 1.0, 1.0, 1.5]
  assert spike_mask(losses, window=3, n_sigma=7.0)[5]
  assert not spike_mask(losses, window=5, n_sigma=7.0)[5]


def test_flat_window_flags_any_strictly_larger_loss():
  losses = [2.0] * 10 + [2.0, 2.0 + 1e-12, 2.0, 2.0 - 1.0]
  mask = spike_mask(losses, window=4, n_sigma=1e6)
  assert mask.nonzero()[0].tolist() == [11]
  # A flat window after losses that differed (the block's reference value
  # is not the flat value): still exact.
  losses = [50.0, -3.0, 7.0, 1e3] + [0.1] * 6 + [0.1, np.nextafter(0.1, 1)]
  mask = spike_mask(losses, window=6, n_sigma=1e6)
  assert mask.nonzero()[0].tolist() == [11]
  np.testing.assert_array_equal(mask, naive_mask(losses, 6, 1e6))


def test_constant_curve_has_no_spikes():
  assert spike_score(np.full(1000, 3.25), window=10) == 0.0


def test_large_offset_keeps_precision():
  # Losses 1e6 +- 1e-3: a naive E[x^2] - E[x]^2 in float64 would lose all
  # the digits of the variance.
  rng = np.random.default_rng(0)
  n = 600
  losses = 1e6 + 1e-3 * rng.standard_normal(n)
  losses[[150, 400]] += 2e-2  # 20 sigma.
  mask = spike_mask(losses, window=50, n_sigma=7.0)
  assert mask.nonzero()[0].tolist() == [150, 400]
  np.testing.assert_array_equal(mask, naive_mask(losses, 50, 7.0))


# ----------------------------------------------------------------------------
# Against the naive reference.


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window", [2, 3, 17, 100, 1000])
@pytest.mark.parametrize("n_sigma", [0.5, 2.0, 7.0])
def test_matches_naive_reference(seed, window, n_sigma):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 400))  # Windows of 1000 are longer than the curve.
  losses = random_curve(rng, n, n_spikes=int(rng.integers(0, 8)))
  expected = naive_mask(losses, window, n_sigma)
  mask = spike_mask(losses, window, n_sigma)
  assert mask.dtype == bool and mask.shape == (n,)
  np.testing.assert_array_equal(mask, expected)
  assert spike_score(losses, window, n_sigma) == expected.sum() / n
  assert count_spikes(losses, window, n_sigma) == naive_runs(expected)


@pytest.mark.parametrize("window", [2, 3, 7, 30, 64])
@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_block_boundaries(window, extra):
  # Windows are assembled from the end of one block of `window` steps and
  # the start of the next: curves of a whole number of blocks, give or take
  # a step, with a window starting on every offset within a block.
  rng = np.random.default_rng(window * 10 + extra)
  n = 5 * window + extra
  losses = random_curve(rng, n, n_spikes=10)
  losses[rng.integers(0, n, n // 10)] = rng.choice([NAN, INF, -INF], n // 10)
  np.testing.assert_array_equal(spike_mask(losses, window, 3.0),
                                naive_mask(losses, window, 3.0))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window", [2, 5, 40])
def test_matches_naive_reference_with_nonfinite(seed, window):
  rng = np.random.default_rng(100 + seed)
  n = 300
  losses = random_curve(rng, n, n_spikes=6)
  bad = rng.integers(0, n, 20)
  losses[bad] = rng.choice([NAN, INF, -INF], bad.size)
  expected = naive_mask(losses, window, 3.0)
  np.testing.assert_array_equal(spike_mask(losses, window, 3.0), expected)
  assert count_spikes(losses, window, 3.0) == naive_runs(expected)


@pytest.mark.parametrize("seed", range(4))
def test_matches_naive_reference_on_plateaus(seed):
  # Quantised losses: many exactly flat windows, and ties with them.
  rng = np.random.default_rng(200 + seed)
  n = 400
  levels = np.repeat(rng.choice([1.5, 2.0, 2.5], 20), 20)[:n]
  losses = levels + np.where(rng.random(n) < 0.05, 0.5, 0.0)
  losses[rng.integers(0, n, 4)] = NAN
  for window in (2, 4, 10, 25):
    np.testing.assert_array_equal(spike_mask(losses, window, 1.2345),
                                  naive_mask(losses, window, 1.2345))


# ----------------------------------------------------------------------------
# Huge outliers: a diverging run.


FLAT = np.full(1000, 2.0)
NOISY = 2.0 + 1e-3 * np.random.default_rng(0).standard_normal(1000)
DECAY = 2.0 + np.exp(-np.arange(1000) / 300.0) + 1e-3 * np.sin(
    1.3 * np.arange(1000))


@pytest.mark.parametrize("base", [FLAT, NOISY, DECAY],
                         ids=["flat", "noisy", "decay"])
@pytest.mark.parametrize("outlier", [1e8, 1e12, 1e20, 1e154, 1e300,
                                     1.7e308])
def test_one_huge_outlier_is_one_spike(base, outlier):
  # The reported failure: with 1e8 or 1e12 at step 500, steps far from it
  # (before it too) were flagged; with 1e300, not even step 500. Steps 501
  # to 600 see the outlier: their threshold is about 0.01 * outlier +
  # 5 * 0.0995 * outlier, far above a normal loss; the others never see it.
  losses = base.copy()
  losses[500] = outlier
  mask = spike_mask(losses, window=100, n_sigma=5)
  assert mask.nonzero()[0].tolist() == [500]
  assert count_spikes(losses, window=100, n_sigma=5) == 1
  assert spike_score(losses, window=100, n_sigma=5) == 1 / 1000
  np.testing.assert_array_equal(mask, naive_mask(losses, 100, 5))


@pytest.mark.parametrize("outlier", [1e8, 1e12, 1e300, -1e12, -1e300])
def test_outlier_leaves_windows_without_it_alone(outlier):
  # A curve with ordinary spikes of its own: with the outlier at step 500,
  # every step whose window misses it (t < 500 or t > 600) is flagged
  # exactly as on the curve without it, which the reference decides.
  rng = np.random.default_rng(11)
  base = random_curve(rng, 1500, n_spikes=12, spike_scale=2.0)
  expected = naive_mask(base, 100, 5.0)
  assert expected[:500].any() and expected[601:].any()
  losses = base.copy()
  losses[500] = outlier
  mask = spike_mask(losses, window=100, n_sigma=5.0)
  np.testing.assert_array_equal(mask[:500], expected[:500])
  np.testing.assert_array_equal(mask[601:], expected[601:])
  assert mask[500] == (outlier > 0)
  np.testing.assert_array_equal(mask, naive_mask(losses, 100, 5.0))


def test_negative_huge_outlier_flags_nothing():
  for base in (FLAT, NOISY):
    losses = base.copy()
    losses[500] = -1e300
    # Steps 501 to 600: mean about -1e298, std about 1e299, so the
    # threshold is about 5e299, and 2.0 is below it.
    assert not spike_mask(losses, window=100, n_sigma=5).any()
    assert count_spikes(losses, window=100, n_sigma=5) == 0


def test_burst_of_huge_losses_then_back_to_normal():
  # 1e300 at steps 500..504, then 2.0 again. Step 500 + j sees j outliers
  # V among 100 losses: threshold V * (p + 5 * sqrt(p * (1 - p))), p = j/100,
  # below V for j <= 3 (0.88 V at j = 3) and above it for j = 4 (1.02 V).
  # Back at 2.0, nothing is flagged: with the burst in the window the
  # threshold is far above 2, and without it the window is flat at 2.0.
  losses = FLAT.copy()
  losses[500:505] = 1e300
  mask = spike_mask(losses, window=100, n_sigma=5)
  assert mask.nonzero()[0].tolist() == [500, 501, 502, 503]
  assert count_spikes(losses, window=100, n_sigma=5) == 1


def test_huge_outlier_among_nonfinite_losses():
  losses = NOISY.copy()
  losses[[499, 500, 501, 502, 700]] = [NAN, 1e300, INF, -INF, NAN]
  mask = spike_mask(losses, window=100, n_sigma=5)
  assert mask.nonzero()[0].tolist() == [499, 500, 501, 700]
  assert count_spikes(losses, window=100, n_sigma=5) == 2
  np.testing.assert_array_equal(mask, naive_mask(losses, 100, 5))


@pytest.mark.parametrize("scale", [2.0 ** 996, 2.0 ** 1020, 2.0 ** -1000])
def test_losses_near_the_float_limits_everywhere(scale):
  # Scaling by a power of two is exact and the rule is scale-invariant, so
  # the curve times 2**996 (about 6.7e299; squares would overflow float64)
  # has the spikes the reference finds on the curve itself.
  rng = np.random.default_rng(5)
  base = random_curve(rng, 800, n_spikes=8, spike_scale=1.0)
  expected = naive_mask(base, 100, 5.0)
  assert 0 < expected.sum() < 20
  np.testing.assert_array_equal(spike_mask(base * scale, 100, 5.0),
                                expected)


def test_near_1e300_with_a_spike():
  losses = 1e300 * (2.0 + 1e-3 * np.random.default_rng(1).standard_normal(
      1000))
  losses[500] = 2.1e300  # About 100 standard deviations above the mean.
  assert spike_mask(losses, window=100, n_sigma=5).nonzero()[0].tolist() == [
      500]


def test_subnormal_losses():
  # Multiples of the smallest float64, 2**-1074. With window 2 and 7 sigma,
  # steps 2 to 5 see [1, 0], [0, 1], [1, 2], [2, 0] (thresholds 4, 4, 5, 8
  # units) and stay below; step 6 sees [0, 1], threshold 4, and 5 exceeds it.
  # Half a unit, the mean of [1, 0], is not a float64: computed unscaled,
  # m and s round to 0 and step 2 would be flagged.
  losses = np.array([1, 0, 1, 2, 0, 1, 5]) * 5e-324
  mask = spike_mask(losses, window=2, n_sigma=7.0)
  assert mask.nonzero()[0].tolist() == [6]

MAGNITUDES = [-3, 0, 3, 8, 12, 50, 154, 300]
LOSS = st.one_of(
    st.floats(1.0, 3.0),
    st.builds(lambda m, e: m * 10.0 ** e, st.floats(-9.99, 9.99),
              st.sampled_from(MAGNITUDES)),
    st.sampled_from([1.0, 2.0, 0.0]),  # Ties and flat runs.
    st.sampled_from([NAN, INF, -INF]),
)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(losses=st.lists(LOSS, min_size=1, max_size=60),
       window=st.integers(2, 20),
       n_sigma=st.sampled_from([0.5, 1.0, 2.0, 5.0, 7.0]))
def test_matches_exact_reference_across_scales(losses, window, n_sigma):
  flagged, tie = exact_mask(losses, window, n_sigma)
  mask = spike_mask(losses, window, n_sigma)
  np.testing.assert_array_equal(mask[~tie], flagged[~tie])


def test_exact_reference_on_a_mixed_curve():
  # The same comparison on a fixed curve mixing 1e-3 to 1e300, with no near
  # tie, so that every step is checked. (Not n_sigma = 1 with window 3: the
  # threshold of a window of two finite losses is then their maximum, which
  # float64 only gets to within rounding of m and s, say 1e138 for -1e154.)
  rng = np.random.default_rng(17)
  n = 400
  losses = 2.0 + 1e-3 * rng.standard_normal(n)
  at = rng.integers(0, n, 40)
  losses[at] = rng.uniform(-9, 9, 40) * 10.0 ** rng.choice(MAGNITUDES, 40)
  losses[rng.integers(0, n, 10)] = rng.choice([NAN, INF, -INF], 10)
  for window, n_sigma in ((3, 1.5), (17, 5.0), (60, 2.0)):
    flagged, tie = exact_mask(losses.tolist(), window, n_sigma)
    assert not tie.any()
    np.testing.assert_array_equal(spike_mask(losses, window, n_sigma),
                                  flagged)


# ----------------------------------------------------------------------------
# NaN and infinities.


def test_nan_and_posinf_are_flagged_and_left_out_of_statistics():
  losses = [1.0, 1.0, INF, 1.0, 1.5, NAN, 1.0, 1.0]
  # Steps 3, 4, 6, 7 see only finite 1.0s (and 1.5) in their windows.
  mask = spike_mask(losses, window=3, n_sigma=7.0)
  assert mask.tolist() == [False, False, True, False, True, True, False,
                           False]
  assert count_spikes(losses, window=3, n_sigma=7.0) == 2


def test_nonfinite_always_flagged_even_without_history():
  assert spike_mask([NAN, INF, 1.0], window=2, n_sigma=1.0).tolist() == [
      True, True, False]


def test_neginf_not_flagged_and_left_out_of_statistics():
  losses = [1.0, 1.0, -INF, 1.0, 1.5]
  # Step 4 sees the finite [1.0, 1.0] of [1.0, -inf, 1.0]: flat.
  assert spike_mask(losses, window=3, n_sigma=7.0).tolist() == [
      False, False, False, False, True]


def test_too_few_finite_values_in_window():
  losses = [NAN, NAN, 1.0, 5.0, NAN, 9.0]
  # Step 3 has one finite earlier value; step 5 sees [5.0] only (window 2).
  assert spike_mask(losses, window=2, n_sigma=1.0).tolist() == [
      True, True, False, False, True, False]


def test_divergence_counts_once():
  losses = np.concatenate([2.0 + 0.01 * np.sin(np.arange(20)),
                           np.full(10, np.nan)])
  assert count_spikes(losses, window=5) == 1
  assert spike_score(losses, window=5) == 10 / 30


def test_all_nan():
  assert spike_score([NAN] * 4, window=2) == 1.0
  assert count_spikes([NAN] * 4, window=2) == 1


# ----------------------------------------------------------------------------
# Inputs, outputs and validation.


def test_empty():
  for empty in ([], np.zeros(0), jnp.zeros(0)):
    mask = spike_mask(empty)
    assert mask.shape == (0,) and mask.dtype == bool
    assert spike_score(empty) == 0.0
    assert count_spikes(empty) == 0


def test_return_types():
  losses = [3.0, 2.9, 2.8, 2.7, 9.0, 2.6]
  assert type(spike_score(losses, 4, 3.0)) is float
  assert type(count_spikes(losses, 4, 3.0)) is int
  assert isinstance(spike_mask(losses, 4, 3.0), np.ndarray)


def test_array_like_inputs_agree():
  rng = np.random.default_rng(7)
  losses = random_curve(rng, 500, n_spikes=6).astype(np.float32)
  expected = naive_mask(losses.astype(np.float64), 20, 4.0)
  for x in (losses, losses.tolist(), jnp.asarray(losses), tuple(losses)):
    np.testing.assert_array_equal(spike_mask(x, 20, 4.0), expected)
  assert spike_score(jnp.asarray(losses), 20, 4.0) == expected.mean()
  assert count_spikes(jnp.asarray(losses), 20, 4.0) == naive_runs(expected)
  # bfloat16 (a NumPy dtype of kind "V") is read too.
  bf16 = jnp.asarray(losses, jnp.bfloat16)
  np.testing.assert_array_equal(
      spike_mask(bf16, 20, 4.0),
      naive_mask(np.asarray(bf16, np.float64), 20, 4.0))


def test_hyperparameter_types_accepted():
  losses = [3.0, 2.9, 2.8, 2.7, 9.0, 2.6]
  expected = spike_mask(losses, 4, 3.0)
  for window in (np.int64(4), np.array(4), jnp.asarray(4)):
    for n_sigma in (3, np.float32(3.0), np.array(3.0), jnp.asarray(3.0)):
      np.testing.assert_array_equal(spike_mask(losses, window, n_sigma),
                                    expected)


# What each argument's message says.
BAD_MESSAGES = {"window": "^`window` must be an integer >= 2",
                "n_sigma": "^`n_sigma` must be finite and > 0",
                "losses": "^`losses` must be "}


# The metrics' rows of the one table of bad values (bad_values.py).
@pytest.mark.parametrize("fn,arg,value", bad_values.cases(*bad_values.METRICS))
def test_bad_argument(fn, arg, value):
  with pytest.raises(ValueError, match=BAD_MESSAGES[arg]):
    bad_values.call_with(fn, arg, value)


def test_bad_window_message():
  with pytest.raises(ValueError) as e:
    spike_score([1.0], window=1)
  assert str(e.value) == "`window` must be an integer >= 2; got 1."


# ----------------------------------------------------------------------------
# Performance.


def test_100k_steps_right():
  rng = np.random.default_rng(3)
  n, window = 100_000, 1000
  losses = random_curve(rng, n, n_spikes=50, spike_scale=5.0)
  # (Speed is measured by hand, not asserted: a timed unit test fails on a
  # busy machine; the docs give the measured time.)
  mask = spike_mask(losses, window=window, n_sigma=7.0)
  score = spike_score(losses, window=window, n_sigma=7.0)
  runs = count_spikes(losses, window=window, n_sigma=7.0)
  assert score == mask.mean() and 0 < runs <= 50
  # Spot-check steps, flagged ones included, against a two-pass float sum.
  steps = np.concatenate([rng.integers(0, n, 100), mask.nonzero()[0][:20],
                          [0, 1, 2, window - 1, window, window + 1, n - 1]])
  for t in steps:
    prev = losses[max(0, t - window):t]
    if prev.size < 2:
      assert not mask[t]
      continue
    m = math.fsum(prev) / prev.size
    s = math.sqrt(math.fsum((prev - m) ** 2) / prev.size)
    assert mask[t] == (losses[t] > m + 7.0 * s), t
