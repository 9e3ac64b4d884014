"""Loss-spike metrics of a training run, computed on the host after the fact.

A step counts as a loss spike, as in OLMo 2 and the AdaGC paper, when its loss
exceeds the mean of the (up to) ``window`` losses immediately before it by more
than ``n_sigma`` of their population standard deviation. `spike_mask` says
which steps are flagged, `spike_score` what fraction of all steps they are,
and `count_spikes` how many separate spikes (runs of consecutive flagged
steps) there were.

These are plain NumPy functions on a recorded loss curve, for evaluating and
comparing runs; they are not meant for `jax.jit`.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from optax_zclip import _validation

# The exponent given to a zero or non-finite loss: below that of any nonzero
# float64 (the smallest subnormal is 2**-1074), so it never sets a scale.
_NO_EXPONENT = -1100


def _as_losses(losses: Any) -> np.ndarray:
  """``losses`` as a 1-D float64 NumPy array, or a ``ValueError``."""
  try:
    arr = np.asarray(losses)
    if arr.dtype.kind in "cSUMm":
      raise TypeError
    if arr.dtype.kind == "O":  # `float(None)` fails; a NumPy cast gives NaN.
      arr = np.array([float(v) for v in arr.ravel()]).reshape(arr.shape)
    arr = arr.astype(np.float64)
  except (TypeError, ValueError):
    text = repr(losses)
    text = text if len(text) <= 60 else text[:57] + "..."
    raise ValueError(
        f"`losses` must be a 1-D array of real numbers; got {text}.") from None
  if arr.ndim != 1:
    raise ValueError(f"`losses` must be a 1-D array; got shape {arr.shape}.")
  return arr


def _validate(window: Any, n_sigma: Any) -> tuple[int, float]:
  """Checks and converts the hyperparameters; raises ``ValueError``."""
  _validation.check_int("window", window, 2)  # Rejects bools and floats.
  try:
    window = operator.index(window)
  except TypeError:
    raise ValueError(
        f"`window` must be an integer >= 2; got {window!r}.") from None
  _validation.check_int("window", window, 2)
  arr = np.asarray(n_sigma)
  if arr.ndim != 0 or arr.dtype.kind not in "iuf":
    raise ValueError(f"`n_sigma` must be finite and > 0; got {n_sigma!r}.")
  n_sigma = float(arr)
  _validation.check_number("n_sigma", n_sigma, lambda v: v > 0,
                           "finite and > 0")
  return window, n_sigma


# Partial statistics of a set of finite losses, as a tuple of arrays
# ``(count, exponent, mean, m2)``: the mean and the sum of squared deviations
# from it, in units of ``2**exponent`` and ``4**exponent``, where
# ``2**exponent`` bounds the magnitude of every loss in the set. Scaled so, the
# mean lies in [-1, 1] and m2 is at most 4 * count: nothing overflows, not
# even for losses near the float64 maximum, whose squares would.
_Stats = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _merge(a: _Stats, b: _Stats) -> _Stats:
  """The statistics of the union of two disjoint sets of losses.

  The pairwise update of Chan, Golub and LeVeque: every term of the new m2 is
  non-negative, so nothing cancels, and an empty set (count 0) leaves the
  other one exactly as it was.

  Args:
    a: the statistics of the earlier losses.
    b: the statistics of the later losses, arrays of the same shape.

  Returns:
    The statistics of both, elementwise.
  """
  na, ea, ma, qa = a
  nb, eb, mb, qb = b
  e = np.maximum(ea, eb)
  # Rescaling by a power of two is exact; what underflows here is below
  # 2**-1022 of the largest loss of the union (of its square, for m2): far
  # below the rounding error of the result.
  ma, qa = np.ldexp(ma, ea - e), np.ldexp(qa, 2 * (ea - e))
  mb, qb = np.ldexp(mb, eb - e), np.ldexp(qb, 2 * (eb - e))
  n = na + nb
  wb = nb / np.maximum(n, 1)
  delta = mb - ma
  return n, e, ma + delta * wb, qa + qb + delta * delta * (na * wb)


def _block_scan(stats: _Stats, block: int, reverse: bool) -> _Stats:
  """Running statistics from the start (or to the end) of each block.

  The steps are cut into consecutive blocks of ``block`` steps. Entry ``i``
  of the result holds the statistics of the losses of its block up to and
  including step ``i`` (with ``reverse``, from step ``i`` to the block's
  end). A doubling scan: after the pass with offset ``d``, entry ``i`` holds
  the ``2 * d`` steps ending (starting) at ``i``, clipped to its block; that
  is ceil(log2(block)) passes over the array, and each result is a balanced
  tree of merges, whose rounding errors grow with the log of its length.

  Args:
    stats: the statistics of each single step.
    block: the block length.
    reverse: whether to scan towards the start of each block.

  Returns:
    The statistics of the block prefix (suffix) of each step.
  """
  n = stats[0].size
  pos = np.arange(n) % block
  d = 1
  while d < min(block, n):
    early = tuple(s[:-d] for s in stats)
    late = tuple(s[d:] for s in stats)
    merged = _merge(early, late)
    if reverse:  # Entry i takes in entry i + d if it is in the same block.
      ok = pos[:-d] + d < block
      stats = tuple(np.concatenate([np.where(ok, m, s[:-d]), s[-d:]])
                    for s, m in zip(stats, merged, strict=True))
    else:  # Entry i takes in entry i - d if it is in the same block.
      ok = pos[d:] >= d
      stats = tuple(np.concatenate([s[:d], np.where(ok, m, s[d:])])
                    for s, m in zip(stats, merged, strict=True))
    d *= 2
  return stats


def _window_stats(x: np.ndarray, window: int) -> _Stats:
  """The statistics of the finite losses in the window of each step.

  The window of step ``t`` is ``x[max(0, t - window):t]``. With the steps
  cut into blocks of ``window`` steps, it is, for ``t <= window``, the first
  ``t`` steps of block 0, and otherwise the end of one block from step
  ``t - window`` on followed by the start of the next one up to step
  ``t - 1`` (empty when ``t - window`` starts a block). Both parts come from
  `_block_scan`, so the statistics of a window are built from its own losses
  only: a loss outside it, however large, cannot change them. (Running sums
  over the whole curve, with the sums before the window subtracted, lose
  every digit once they have held a loss of 1e8 next to losses of 1.)

  Args:
    x: the losses, float64.
    window: the window length, >= 2.

  Returns:
    The statistics of the window of each step.
  """
  n = x.size
  finite = np.isfinite(x)
  mant, exp = np.frexp(np.where(finite, x, 0.0))  # x == mant * 2**exp.
  exp = np.where(finite & (x != 0), exp, _NO_EXPONENT).astype(np.int32)
  single = (finite.astype(np.int64), exp, mant, np.zeros(n))
  empty = (np.zeros(n, np.int64), np.full(n, _NO_EXPONENT, np.int32),
           np.zeros(n), np.zeros(n))

  t = np.arange(n)
  lo = t - window
  head = _block_scan(single, window, reverse=False)
  # The start of the window's second block, up to step t - 1.
  use = (t >= 1) & ((lo <= 0) | (lo % window != 0))
  at = np.maximum(t - 1, 0)
  late = tuple(np.where(use, h[at], z) for h, z in zip(head, empty,
                                                       strict=True))
  if n <= window + 1:  # No window leaves block 0.
    return _merge(empty, late)
  tail = _block_scan(single, window, reverse=True)
  use = lo > 0
  at = np.maximum(lo, 0)
  early = tuple(np.where(use, s[at], z) for s, z in zip(tail, empty,
                                                        strict=True))
  return _merge(early, late)


def spike_mask(losses: Any, window: int = 1000,
               n_sigma: float = 7.0) -> np.ndarray:
  """Which steps of a loss curve are loss spikes.

  Step ``t`` is flagged when ``losses[t] > m + n_sigma * s``, where ``m`` and
  ``s`` are the mean and the population standard deviation (divided by N) of
  the finite losses among the ``window`` steps before it,
  ``losses[max(0, t - window):t]``, provided there are at least 2 of them.
  A NaN or ``+inf`` loss is always flagged, a ``-inf`` loss never; neither
  enters the windows of later steps.

  Each window's statistics come from its own losses only, scaled so that no
  square overflows, so a huge loss changes no window without it. How it is
  computed, and what it costs: :ref:`telemetry-scoring`.

  Args:
    losses: the loss of each step, a 1-D array-like (a list, a NumPy or a JAX
      array) of real numbers; converted to float64.
    window: the number of steps before each step whose losses form its
      baseline; an integer >= 2.
    n_sigma: how many standard deviations above the baseline mean a loss must
      be to count as a spike; finite and > 0.

  Returns:
    A boolean NumPy array of the same length as ``losses``, True at the
    flagged steps.

  Raises:
    ValueError: if ``losses`` is not a 1-D array of real numbers, ``window``
      is not an integer >= 2, or ``n_sigma`` is not a finite number > 0.

  Example:
    >>> from optax_zclip import spike_mask
    >>> losses = [3.0, 2.9, 2.8, 2.7, 9.0, 2.6, float("nan"), 2.4]
    >>> spike_mask(losses, window=4, n_sigma=3.0).nonzero()[0].tolist()
    [4, 6]

  References:
    Wang et al., `AdaGC: Improving Training Stability for Large Language
    Model Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025.

    Team OLMo, `2 OLMo 2 Furious <https://arxiv.org/abs/2501.00656>`_, 2025.
  """
  x = _as_losses(losses)
  window, n_sigma = _validate(window, n_sigma)
  n = x.size
  finite = np.isfinite(x)
  mask = np.isnan(x) | (x == np.inf)
  if n == 0:
    return mask

  # Window of step t: indices [lo[t], t); c[t] finite losses in it, which are
  # the finite losses number a[t] .. b[t] - 1 (counting finite ones only).
  t = np.arange(n)
  lo = np.maximum(t - window, 0)
  n_before = np.concatenate([[0], np.cumsum(finite)])
  a = n_before[lo]
  b = n_before[t]
  c = b - a
  has_stats = c >= 2

  # A window is exactly flat when no finite loss in it differs from the
  # finite loss before it; counted with integers, so it is exact, and a flat
  # window compares with its own value rather than with a rounded mean.
  f = x[finite]
  changes = np.concatenate([[0, 0], np.cumsum(f[1:] != f[:-1])])
  flat = np.zeros(n, bool)
  last = np.zeros(n)
  idx = np.nonzero(has_stats)[0]
  flat[idx] = changes[b[idx]] == changes[a[idx] + 1]
  last[idx] = f[b[idx] - 1]

  # Compared in the window's units of 2**exp: the same roundings as
  # `x > m + n_sigma * s` in the normal float64 range, and none lost where
  # m or s would be subnormal or the threshold would overflow. A loss too
  # large for those units is +inf there, so flagged, as it should be: the
  # threshold there is at most about 1 + n_sigma.
  cnt, exp, mean, m2 = _window_stats(x, window)
  with np.errstate(over="ignore"):
    std = np.sqrt(m2 / np.maximum(cnt, 1))
    spike = np.ldexp(x, -exp) > mean + n_sigma * std
  spike = np.where(flat, x > last, spike)
  return mask | (has_stats & spike)


def spike_score(losses: Any, window: int = 1000,
                n_sigma: float = 7.0) -> float:
  """Fraction of the steps of a loss curve that are loss spikes.

  The flagged steps are those of `spike_mask` (see there for the definition
  and the handling of NaN and infinite losses); the score is their number
  divided by the number of steps, the "spike score" of OLMo 2 reported by
  AdaGC. An empty curve scores 0.0.

  Args:
    losses: the loss of each step, a 1-D array-like of real numbers.
    window: the number of steps before each step whose losses form its
      baseline; an integer >= 2.
    n_sigma: how many standard deviations above the baseline mean a loss must
      be to count as a spike; finite and > 0.

  Returns:
    The fraction of flagged steps, a Python float in [0, 1].

  Raises:
    ValueError: if ``losses`` is not a 1-D array of real numbers, ``window``
      is not an integer >= 2, or ``n_sigma`` is not a finite number > 0.

  Example:
    >>> from optax_zclip import spike_score
    >>> losses = [3.0, 2.9, 2.8, 2.7, 9.0, 2.6, 2.5, 2.4]
    >>> spike_score(losses, window=4, n_sigma=3.0)
    0.125

  References:
    Wang et al., `AdaGC: Improving Training Stability for Large Language
    Model Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025.

    Team OLMo, `2 OLMo 2 Furious <https://arxiv.org/abs/2501.00656>`_, 2025.
  """
  mask = spike_mask(losses, window, n_sigma)
  return float(mask.mean()) if mask.size else 0.0


def count_spikes(losses: Any, window: int = 1000,
                 n_sigma: float = 7.0) -> int:
  """Number of separate loss spikes in a loss curve.

  A spike is a maximal run of consecutive steps flagged by `spike_mask` (see
  there for the definition and the handling of NaN and infinite losses), so
  a loss that stays high for several steps counts once, and a loss that
  turns NaN for good counts once.

  Args:
    losses: the loss curve, a 1-D array-like of real numbers, as for
      `spike_score`.
    window: the length of each step's baseline, an integer >= 2, as for
      `spike_score`.
    n_sigma: the threshold in standard deviations, finite and > 0, as for
      `spike_score`.

  Returns:
    The number of runs of flagged steps, a Python int.

  Raises:
    ValueError: for the arguments `spike_score` refuses.

  Example:
    >>> from optax_zclip import count_spikes
    >>> losses = [3.0, 2.9, 2.8, 2.7, 9.0, 9.0, 2.6, 2.5, 12.0]
    >>> count_spikes(losses, window=4, n_sigma=1.0)
    2

  References:
    Wang et al., `AdaGC: Improving Training Stability for Large Language
    Model Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025.

    Team OLMo, `2 OLMo 2 Furious <https://arxiv.org/abs/2501.00656>`_, 2025.
  """
  mask = spike_mask(losses, window, n_sigma)
  starts = mask[1:] & ~mask[:-1]
  return int(mask[:1].sum() + starts.sum())
