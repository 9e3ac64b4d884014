"""The bad hyperparameters of every public function: one table, `TABLE`.

Each row lists an argument of `zclip`, `adagc`, `autoclip`,
`clip_by_global_norm`, `skip_spikes`, `spike_mask`, `spike_score` or
`count_spikes`, what it allows, and bad values for every constraint: out of
range, non-finite, the wrong type (a string for a number, None where None is
not allowed, a float for an integer), and arrays of the wrong rank. Each
must raise `ValueError` at call (build) time, with the argument's name in
backticks (`assert_refused`).

`test_errors.py` runs every row, checks that the table covers every
argument, and renders it as the documentation's "Errors" section; each
transform's own suite runs its rows (`cases`).
"""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_zclip

NAN, INF = math.nan, math.inf
METRICS = ("spike_mask", "spike_score", "count_spikes")
LOSSES = [3.0, 2.9, 2.8, 2.7, 9.0, 2.6]

# Python floats that float32, the precision the transforms compute in, turns
# into 1.0, 0.0 and inf.
ROUNDS_TO_1, ROUNDS_TO_0, ROUNDS_TO_INF = 0.9999999999, 1e-50, 1e39
INT32_MAX = 2**31 - 1

# (functions, argument, allowed, bad values). The first bad value gives the
# example message of the documentation's table.
TABLE = [
    ("zclip", "alpha", "float in (0, 1), in float32",
     [1.0, 0.0, -0.5, 1.5, NAN, INF, ROUNDS_TO_1, ROUNDS_TO_0, 1 - 1e-9,
      jnp.asarray(1.0), np.float64(ROUNDS_TO_1), "0.5", None,
      np.array([0.5]), jnp.full(2, 0.5), [0.5], 0.5 + 0j, True,
      np.bool_(True), jnp.asarray(True)]),
    ("zclip", "z_thresh", "finite float > 0, in float32",
     [0.0, -1.0, INF, NAN, ROUNDS_TO_INF, ROUNDS_TO_0, jnp.asarray(-1.0),
      "2.5", None, np.array([2.5]), (2.5,), True, np.array(True)]),
    ("zclip", "max_grad_norm", "float > 0, inf (no cap), or None",
     [0.0, -1.0, -INF, NAN, ROUNDS_TO_0, ROUNDS_TO_INF, jnp.asarray(0.0),
      "1.0",
      np.array([1.0, 2.0]), jnp.ones((1, 1))]),
    ("zclip", "eps", "finite float >= 0, in float32",
     [-1e-6, INF, NAN, ROUNDS_TO_INF, jnp.asarray(-1.0), "1e-6", None,
      np.ones((1, 1))]),
    ("zclip", "warmup_steps", "integer in [1, 2**31 - 1]",
     [0, -3, INT32_MAX + 1, np.int64(2**40), jnp.asarray(0), 2.5, 25.0,
      np.float64(25.0), np.array(2.5), jnp.asarray(25.0), True, "25", None,
      np.array([25])]),
    ("zclip", "mode", '"zscore" or "percentile" (any case)',
     ["z-score", "", None, 3, ["zscore"]]),
    ("zclip", "clip_option", '"adaptive_scaling", "mean" or "max" (any case)',
     ["adaptive", None, 3, "percentile"]),
    ("zclip", "clip_factor", "finite float > 0, in float32",
     [0.0, -0.5, INF, NAN, ROUNDS_TO_INF, ROUNDS_TO_0, jnp.asarray(0.0), "1",
      None, np.array([1.0])]),
    ("zclip", "skip_update_on_spike", "bool",
     ["yes", None, 1, 0.0, np.array([True])]),
    ("zclip", "max_consecutive_spikes", "integer in [1, 2**31 - 1], or None",
     [0, -1, INT32_MAX + 1, jnp.asarray(0), 2.5, 50.0, True, "50",
      np.array([50])]),
    ("adagc", "lambda_rel", "finite float > 0, in float32",
     [0.0, -1.0, INF, NAN, ROUNDS_TO_INF, ROUNDS_TO_0, jnp.asarray(-1.0),
      "1.05", None, np.array([1.05])]),
    ("adagc", "beta", "float in (0, 1), in float32",
     [1.0, 0.0, -0.1, NAN, ROUNDS_TO_1, ROUNDS_TO_0, jnp.asarray(1.0),
      "0.98", None, np.array([0.98, 0.99])]),
    ("adagc", "warmup_steps", "integer in [1, 2**31 - 1]",
     [0, -1, INT32_MAX + 1, jnp.asarray(-1), 2.5, 100.0, True, "100", None,
      np.array([100])]),
    ("adagc", "max_grad_norm", "float > 0, inf (no cap), or None",
     [0.0, -2.0, -INF, NAN, ROUNDS_TO_0, ROUNDS_TO_INF, "1", [1.0]]),
    ("adagc", "eps", "finite float >= 0, in float32",
     [-1.0, INF, NAN, ROUNDS_TO_INF, "0", None, np.array([0.0])]),
    ("autoclip", "percentile", "float in [0, 100]",
     [100.5, -1.0, NAN, INF, jnp.asarray(101.0), "10", None,
      np.array([10.0, 20.0])]),
    ("autoclip", "window", "Python integer >= 1 (not a jax array)",
     [0, -1, 2.0, 1.5, True, "8", None, np.array([8]), jnp.asarray(8)]),
    ("clip_by_global_norm", "max_norm", "float > 0, inf (no cap), or None",
     [0.0, -1.0, -INF, NAN, ROUNDS_TO_0, ROUNDS_TO_INF, jnp.asarray(-1.0),
      "1.0", np.array([1.0, 2.0]), True]),
    ("skip_spikes", "inner", "optax.GradientTransformation",
     [None, optax.adamw, "adamw", (optax.sgd(1.0).init, optax.sgd(1.0).update),
      optax.MultiSteps(optax.sgd(1.0), 2), 1.0]),
    ("skip_spikes", "window", "Python integer >= 2 (not a jax array)",
     [1, 0, -4, 128.0, 2.5, True, "128", None, np.array([128]),
      jnp.asarray(128)]),
    ("skip_spikes", "sigma", "finite float > 0, in float32",
     [0.0, -6.0, INF, NAN, ROUNDS_TO_INF, ROUNDS_TO_0, jnp.asarray(0.0), "6",
      None, np.array([6.0]), True]),
    ("skip_spikes", "loss_test", "bool", ["no", None, 0, 1.0,
                                          np.array([True])]),
    ("skip_spikes", "zero_copy", "bool", ["yes", None, 1, 0.0,
                                          np.array([True])]),
    (METRICS, "losses", "1-D array-like of real numbers",
     [np.zeros((2, 3)), 3.0, [[1.0, 2.0]], ["a", "b"], [1.0 + 2j, 3.0],
      [1.0, None], [[1.0], [1.0, 2.0]], "loss"]),
    (METRICS, "window", "integer >= 2",
     [1, 0, -5, 2.0, 10.5, True, None, "10", [10], np.array([10]),
      jnp.asarray(1)]),
    (METRICS, "n_sigma", "finite float > 0",
     [0, 0.0, -1.0, INF, NAN, None, "7", [7.0], np.array([7.0])]),
]



def call_with(fn: str, arg: str, value):
  """``fn`` (a public function's name) called with ``arg=value``; the other
  arguments are valid (a metric's losses `LOSSES`, `skip_spikes`' inner
  optimizer sgd)."""
  f = getattr(optax_zclip, fn)
  if fn in METRICS:
    if arg == "losses":
      return f(value)
    return f(LOSSES, **{arg: value})
  if fn == "skip_spikes" and arg != "inner":
    return f(**{"inner": optax.sgd(1.0), arg: value})
  return f(**{arg: value})


def assert_refused(fn: str, arg: str, value):
  """``fn(arg=value)`` raises a `ValueError` that starts with ``arg``'s
  name."""
  with pytest.raises(ValueError, match=f"^`{arg}` must be "):
    call_with(fn, arg, value)


def cases(*only: str) -> list:
  """``(fn, arg, value)`` for every bad value of the table, as pytest
  parameters; only those of the functions ``only`` if given."""
  out = []
  for fns, arg, _, values in TABLE:
    for fn in (fns,) if isinstance(fns, str) else fns:
      if only and fn not in only:
        continue
      for value in values:
        # No memory address in an id: pytest-xdist's workers must collect
        # the same ids.
        text = re.sub(r" at 0x[0-9a-f]+", "", repr(value).replace("\n", ""))
        out.append(pytest.param(fn, arg, value, id=f"{fn}-{arg}={text[:30]}"))
  return out
