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

# Outputs are computed in blocks of at least this many steps, each with its
# own reference value subtracted from the losses it reads (see `spike_mask`).
_MIN_BLOCK = 4096


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
  _validation.check_number("n_sigma", n_sigma, lambda v: v > 0, "finite and > 0")
  return window, n_sigma


def spike_mask(losses: Any, window: int = 1000,
               n_sigma: float = 7.0) -> np.ndarray:
  """Which steps of a loss curve are loss spikes.

  Step ``t`` is flagged when ``losses[t] > m + n_sigma * s``, where ``m`` and
  ``s`` are the mean and the population standard deviation (divided by N, not
  N - 1) of the finite losses among the ``window`` steps immediately before
  it, ``losses[max(0, t - window):t]``, provided there are at least 2 of them.
  So the first two steps are never flagged for a finite loss, and a window
  whose losses are all equal (``s == 0``) flags any strictly larger loss.

  Non-finite losses: a NaN or ``+inf`` loss is always flagged (a diverged
  step is a spike, whatever came before it); a ``-inf`` loss is never
  flagged. Neither takes part in the window statistics of later steps: a
  window's mean and standard deviation use only its finite losses, and a
  step whose window holds fewer than 2 finite losses is flagged only if its
  own loss is NaN or ``+inf``.

  Runs in O(n) time on n losses, whatever the window: the window sums come
  from cumulative sums in float64, over blocks of steps that each subtract a
  reference value of their own from the losses first, so that an offset in
  the loss (say 1e4 +- 1e-3) costs no precision.

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
    >>> from optax_zclip._metrics import spike_mask
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

  spike = np.zeros(n, bool)
  block = max(window, _MIN_BLOCK)
  with np.errstate(all="ignore"):  # Only absurd losses (~1e154) overflow.
    for b0 in range(0, n, block):
      b1 = min(n, b0 + block)
      s0 = lo[b0]  # Every window of this block lies in [s0, b1 - 1).
      fin = finite[s0:b1]
      ref = x[s0:b1][fin].mean() if fin.any() else 0.0
      y = np.where(fin, x[s0:b1] - ref, 0.0)
      c1 = np.concatenate([[0.0], np.cumsum(y)])
      c2 = np.concatenate([[0.0], np.cumsum(y * y)])
      i, j = lo[b0:b1] - s0, t[b0:b1] - s0
      cnt = np.maximum(c[b0:b1], 1)
      mean = (c1[j] - c1[i]) / cnt
      var = np.maximum((c2[j] - c2[i]) / cnt - mean * mean, 0.0)
      thresh = mean + n_sigma * np.sqrt(var)
      spike[b0:b1] = (x[b0:b1] - ref) > thresh
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
    >>> from optax_zclip._metrics import spike_score
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
    losses: the loss of each step, a 1-D array-like of real numbers.
    window: the number of steps before each step whose losses form its
      baseline; an integer >= 2.
    n_sigma: how many standard deviations above the baseline mean a loss must
      be to count as a spike; finite and > 0.

  Returns:
    The number of runs of flagged steps, a Python int.

  Raises:
    ValueError: if ``losses`` is not a 1-D array of real numbers, ``window``
      is not an integer >= 2, or ``n_sigma`` is not a finite number > 0.

  Example:
    >>> from optax_zclip._metrics import count_spikes
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
