"""Loss-spike rules written out step by step, to test the fast versions.

`naive_mask` follows the definition with Python's `statistics` (float, one
window at a time); `exact_mask` decides it in exact rational arithmetic, for
curves whose magnitudes a float computation cannot square; `naive_runs`
counts runs of flagged steps.
"""

from __future__ import annotations

import math
import statistics
from fractions import Fraction

import numpy as np

INF = float("inf")


def naive_mask(losses, window, n_sigma):
  """The definition, step by step: O(n * window) with `statistics`."""
  losses = [float(v) for v in losses]
  out = []
  for t, v in enumerate(losses):
    if math.isnan(v) or v == INF:
      out.append(True)
      continue
    prev = [u for u in losses[max(0, t - window):t] if math.isfinite(u)]
    if len(prev) < 2:
      out.append(False)
      continue
    m = statistics.mean(prev)
    s = _pstdev(prev)
    out.append(v > m + n_sigma * s)
  return np.array(out, bool)


def _pstdev(values):
  """`statistics.pstdev` as Python 3.11 computes it on every Python: the
  square root of the exact (rational) variance, rounded to a float at the
  end. Python 3.10 rounds the variance to a float first, which overflows
  once the deviations pass 1e154."""
  xs = [Fraction(v) for v in values]
  mean = sum(xs) / len(xs)
  var = sum((x - mean) ** 2 for x in xs) / len(xs)
  n, d = var.numerator, var.denominator
  # An integer square root with at least 64 bits, then scaled back.
  shift = max(0, 128 - (n.bit_length() - d.bit_length()))
  shift += shift % 2
  return math.ldexp(float(math.isqrt((n << shift) // d)), -shift // 2)


def naive_runs(mask):
  runs, prev = 0, False
  for f in mask:
    runs += bool(f and not prev)
    prev = f
  return runs


def exact_mask(losses, window, n_sigma, tol=1e-11):
  """The definition in exact rational arithmetic, and where it is a near tie.

  Returns ``(flagged, tie)``: ``flagged[t]`` decides ``x > m + n_sigma * s``
  exactly, with ``Fraction``s (no rounding, no overflow at any magnitude),
  as ``d = x - m > 0 and d**2 > n_sigma**2 * var``. ``tie[t]`` marks a finite
  loss within ``tol * max|window| * (1 + n_sigma)`` of the threshold of a
  window that is not flat: there a float64 computation may round either way.
  """
  k = Fraction(n_sigma)
  flagged, tie = [], []
  for t, v in enumerate(losses):
    if math.isnan(v) or v == INF:
      flagged.append(True)
      tie.append(False)
      continue
    prev = [Fraction(u) for u in losses[max(0, t - window):t]
            if math.isfinite(u)]
    if len(prev) < 2 or v == -INF:
      flagged.append(False)
      tie.append(False)
      continue
    m = sum(prev) / len(prev)
    var = sum((u - m) ** 2 for u in prev) / len(prev)
    d = Fraction(v) - m
    flagged.append(d > 0 and d * d > k * k * var)
    # |d - k s| <= band, with k s = sqrt(k**2 var), squared out exactly.
    band = Fraction(tol) * max(abs(u) for u in prev) * (1 + k)
    near = (var > 0 and d + band >= 0 and k * k * var <= (d + band) ** 2
            and (d - band <= 0 or k * k * var >= (d - band) ** 2))
    tie.append(near)
  return np.array(flagged, bool), np.array(tie, bool)
