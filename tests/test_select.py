"""`optax_zclip._select`: the inner update of `skip_spikes`, kept or not.

Its jaxpr evaluation must give the function's own values on every construct
an optimizer's update contains (nested jits, `cond`, `scan`, `custom_jvp`,
results nothing reads, literal outputs, closed-over constants), on every
JAX in the supported range, and raise `SelectUnsupported`, naming the
cause, on anything it does not know rather than misbehave. The selects
themselves: against NumPy here, and through `skip_spikes` in
tests/test_skip.py (bit for bit against `select_after`, the warning, the
named scopes).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_zclip import _select

CONST = np.arange(1.0, 6.0, dtype=np.float32)


@jax.jit
def _nested(x):
  return jnp.sin(x) * 2.0


def _everything(x, y):
  a, _ = jax.lax.sort_key_val(x, y)  # the second result is never read
  b = jax.lax.cond(a.sum() > 0, lambda z: z + 1.0, lambda z: z * z, a)
  total, cums = jax.lax.scan(lambda c, z: (c + z, c * z), 0.0, b)
  out = _nested(b) + jax.nn.relu(x - 1.0) + CONST
  return out, total, cums, 2.0, x  # a literal and an input as outputs


def _evaluated(f, *args, substitute=lambda v, x: x):
  closed = jax.make_jaxpr(f)(*args)
  return _select._evaluate(closed, list(args), substitute)  # noqa: SLF001


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "jit"])
def test_the_evaluation_gives_the_function_s_values(traced):
  x = np.array([0.5, -1.0, 3.0, 2.0, -0.25], np.float32)
  y = np.arange(5, dtype=np.int32)[::-1].copy()
  want = _everything(x, y)
  run = jax.jit(lambda x, y: _evaluated(_everything, x, y)) if traced else (
      lambda x, y: _evaluated(_everything, x, y))
  got = run(x, y)
  assert len(got) == len(jax.tree.leaves(want))
  for g, w in zip(got, jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  # Plain NumPy, independently: the sorted x, then the taken branch.
  a = np.sort(x.astype(np.float64))  # keys are x: sorted ascending
  b = a + 1.0 if a.sum() > 0 else a * a
  np.testing.assert_allclose(got[1], b.sum(), rtol=1e-6)
  np.testing.assert_allclose(
      got[0], np.sin(b) * 2 + np.maximum(x - 1.0, 0) + CONST, rtol=1e-6)


def test_every_result_is_substituted_before_anything_reads_it():
  seen = []

  def substitute(v, x):
    seen.append(v)
    return x * 10.0

  def f(x):
    return (x + 1.0) * 2.0

  (out,) = _evaluated(f, np.float32(3.0), substitute=substitute)
  # (3 + 1) * 10, then * 2 * 10: the multiply read the substitute.
  assert float(out) == 800.0
  assert len(seen) == len(jax.make_jaxpr(f)(1.0).jaxpr.eqns) == 2


def _fake(**eqn_fields):
  eqn = types.SimpleNamespace(primitive=jax.lax.sin_p, params={}, invars=[],
                              outvars=[], **eqn_fields)
  jaxpr = types.SimpleNamespace(constvars=[], invars=[], outvars=[],
                                eqns=[eqn])
  return types.SimpleNamespace(jaxpr=jaxpr, consts=[])


def test_what_the_evaluation_does_not_know_is_unsupported_and_named():
  with pytest.raises(_select.SelectUnsupported, match="no `ctx`"):
    _select._evaluate(  # noqa: SLF001
        _fake(), [], lambda v, x: x)
  with pytest.raises(_select.SelectUnsupported, match="no `source_info`"):
    _select._evaluate(  # noqa: SLF001
        _fake(ctx=types.SimpleNamespace(manager=None)), [], lambda v, x: x)
  with pytest.raises(_select.SelectUnsupported, match="no `manager`"):
    _select._evaluate(  # noqa: SLF001
        _fake(ctx=object(), source_info=None), [], lambda v, x: x)
  with pytest.raises(_select.SelectUnsupported, match="no ClosedJaxpr"):
    _select._evaluate(  # noqa: SLF001
        object(), [], lambda v, x: x)
  # A variable that no equation wrote (the input, left out of `invars`
  # here): an atom the evaluation cannot read.
  closed = jax.make_jaxpr(lambda x: x * 2.0)(1.0)
  with pytest.raises(_select.SelectUnsupported, match="unknown jaxpr atom"):
    _select._evaluate(  # noqa: SLF001

        types.SimpleNamespace(
            jaxpr=types.SimpleNamespace(
                constvars=[], invars=[], outvars=closed.jaxpr.outvars,
                eqns=closed.jaxpr.eqns),
            consts=[]), [], lambda v, x: x)


def _adam_like(updates, state):
  """An update whose new state feeds its updates, as AdamW's does, with a
  state leaf passed through, a literal one and one shared by two leaves."""
  mu = jax.tree.map(lambda m, g: 0.5 * m + g, state["mu"], updates)
  out = jax.tree.map(lambda m: -2.0 * m, mu)
  shared = state["count"] + 1
  return out, {"mu": mu, "count": shared, "count2": shared,
               "fixed": state["fixed"], "zero": 0.0}


@pytest.mark.parametrize("select", [_select.select_as_computed,
                                    _select.select_after])
@pytest.mark.parametrize("keep", [True, False])
def test_a_kept_step_is_the_update_and_a_skipped_one_keeps_the_state(
    select, keep):
  g = {"a": np.array([1.0, -2.0], np.float32), "b": np.float32(4.0)}
  s = {"mu": {"a": np.array([0.5, 0.25], np.float32), "b": np.float32(-1.0)},
       "count": np.int32(3), "count2": np.int32(3),
       "fixed": np.float32(7.0), "zero": np.float32(5.0)}
  out, new = jax.jit(lambda g, s, k: select(_adam_like, k, g, s))(
      g, s, np.bool_(keep))
  mu = {k: 0.5 * s["mu"][k].astype(np.float64) + g[k] for k in g}
  for k in g:
    np.testing.assert_allclose(out[k], -2.0 * mu[k] if keep else 0.0)
    np.testing.assert_allclose(new["mu"][k], mu[k] if keep else s["mu"][k])
  assert int(new["count"]) == int(new["count2"]) == (4 if keep else 3)
  assert float(new["fixed"]) == 7.0
  assert float(new["zero"]) == (0.0 if keep else 5.0)


def test_a_nan_update_of_a_skipped_step_does_not_leak():
  g = np.array([np.nan, 1.0], np.float32)
  s = np.zeros(2, np.float32)
  out, new = _select.select_as_computed(
      lambda u, m: (u * 2.0, m + u), jnp.bool_(False), g, s)
  np.testing.assert_array_equal(out, [0.0, 0.0])
  np.testing.assert_array_equal(new, s)


def test_selects_are_folded_where_the_state_is_computed():
  # The new state is selected as it is computed: the updates read the
  # selected value, so a skipped step's updates come from the old state
  # (then zeroed) and only one select per state leaf is traced.
  state = {"m": np.ones(3, np.float32)}
  jaxpr = jax.make_jaxpr(lambda k, g, s: _select.select_as_computed(
      lambda u, s: _adam_like_small(u, s), k, g, s))(
          jnp.bool_(True), np.ones(3, np.float32), state)
  # the moment's, and the updates' zeros (jnp.where is a nested jit)
  assert str(jaxpr).count("select_n") == 2


def _adam_like_small(u, s):
  m = 0.5 * s["m"] + u
  return m * 3.0, {"m": m}


def test_an_optax_chain_is_evaluated_bit_for_bit():
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p), params)

  def update(u, s):
    return tx.update(u, s, params)

  want = jax.jit(update)(grads, state)
  got = jax.jit(lambda g, s: _select.select_as_computed(
      update, jnp.bool_(True), g, s))(grads, state)
  for w, x in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(np.asarray(w), np.asarray(x))
