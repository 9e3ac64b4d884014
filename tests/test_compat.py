"""`optax_zclip._compat`, the one module over JAX's version differences.

The jaxpr replay (what `skip_spikes` runs its inner update through) must
give the function's own values on every construct an optimizer's update
contains (nested jits, `cond`, `scan`, `custom_jvp`, results nothing reads,
literal outputs, closed-over constants), on every JAX in the supported
range, and say `ReplayUnsupported` on anything it does not know rather than
misbehave. The mesh helpers must run the same program on every release.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from optax_zclip import _compat

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


def _replayed(f, *args, substitute=lambda v, x: x):
  closed = jax.make_jaxpr(f)(*args)
  return _compat.replay_jaxpr(closed, list(args), substitute)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "jit"])
def test_the_replay_gives_the_function_s_values(traced):
  x = np.array([0.5, -1.0, 3.0, 2.0, -0.25], np.float32)
  y = np.arange(5, dtype=np.int32)[::-1].copy()
  want = _everything(x, y)
  run = jax.jit(lambda x, y: _replayed(_everything, x, y)) if traced else (
      lambda x, y: _replayed(_everything, x, y))
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

  (out,) = _replayed(f, np.float32(3.0), substitute=substitute)
  # (3 + 1) * 10, then * 2 * 10: the multiply read the substitute.
  assert float(out) == 800.0
  assert len(seen) == len(jax.make_jaxpr(f)(1.0).jaxpr.eqns) == 2


def _fake(**eqn_fields):
  eqn = types.SimpleNamespace(primitive=jax.lax.sin_p, params={}, invars=[],
                              outvars=[], **eqn_fields)
  jaxpr = types.SimpleNamespace(constvars=[], invars=[], outvars=[],
                                eqns=[eqn])
  return types.SimpleNamespace(jaxpr=jaxpr, consts=[])


def test_what_the_replay_does_not_know_is_unsupported_and_named(monkeypatch):
  with pytest.raises(_compat.ReplayUnsupported, match="no `ctx`"):
    _compat.replay_jaxpr(_fake(), [], lambda v, x: x)
  with pytest.raises(_compat.ReplayUnsupported, match="no `manager`"):
    _compat.replay_jaxpr(_fake(ctx=object()), [], lambda v, x: x)
  with pytest.raises(_compat.ReplayUnsupported, match="no ClosedJaxpr"):
    _compat.replay_jaxpr(object(), [], lambda v, x: x)
  # A variable that no equation wrote (the input, left out of `invars`
  # here): an atom the replay cannot read.
  closed = jax.make_jaxpr(lambda x: x * 2.0)(1.0)
  with pytest.raises(_compat.ReplayUnsupported, match="unknown jaxpr atom"):
    _compat.replay_jaxpr(
        types.SimpleNamespace(
            jaxpr=types.SimpleNamespace(
                constvars=[], invars=[], outvars=closed.jaxpr.outvars,
                eqns=closed.jaxpr.eqns),
            consts=[]), [], lambda v, x: x)
  monkeypatch.setattr(_compat, "_Literal", None)
  with pytest.raises(_compat.ReplayUnsupported, match="Literal is missing"):
    _replayed(lambda x: x + 1.0, 1.0)


@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_and_set_mesh_run_on_every_release(check_vma):
  mesh = _compat.mesh(np.asarray(jax.devices()[:1]), ("data",))

  def f(x):
    return jax.lax.psum(jnp.sum(x * x), "data")

  step = jax.jit(_compat.shard_map(f, mesh=mesh, in_specs=P("data"),
                                   out_specs=P(), check_vma=check_vma))
  with _compat.set_mesh(mesh):
    assert float(step(jnp.arange(4.0))) == 14.0


def test_every_mesh_axis_type_builds_a_mesh():
  kinds = _compat.mesh_axis_types()
  assert "auto" in kinds
  for kind in kinds.values():
    mesh = _compat.mesh(np.asarray(jax.devices()[:1]), ("x",), kind)
    assert mesh.axis_names == ("x",)


def test_the_barrier_traces_under_jit_vmap_and_grad_on_every_release():
  # jax 0.4.36 has no batching rule for the barrier; there it is left out
  # under vmap rather than failing. Its values are the identity's.
  x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
  f = jax.jit(jax.vmap(lambda r: jnp.sum(_compat.optimization_barrier(r) ** 2)))
  np.testing.assert_allclose(f(x), (x.astype(np.float64) ** 2).sum(axis=1))
  np.testing.assert_array_equal(jax.jit(_compat.optimization_barrier)(x), x)
  g = jax.grad(lambda r: jnp.sum(_compat.optimization_barrier(r) ** 2))(x)
  np.testing.assert_allclose(g, 2 * x)
