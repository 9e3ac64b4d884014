"""Odd gradient trees: mixed dtypes, empty and scalar leaves, custom nodes.

For every clipping transform of the registry (transforms.py), on one tree
holding float32, bfloat16, float16 and complex64 leaves, zero-size leaves
of shapes ``(0,)`` and ``(3, 0)``, scalars, nested dicts / lists / tuples,
a class registered with `jax.tree_util.register_pytree_node_class` and a
dataclass registered with `jax.tree_util.register_dataclass`: the output
keeps the tree's structure and every leaf's dtype and shape, the statistics
are float32 (the counters int32), the norm is the float64 NumPy norm, and
each leaf is scaled as the float64 reference says.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transforms import CLIPPERS, TRANSFORMS


@jax.tree_util.register_pytree_node_class
class Pair:
  """A custom pytree node with two children."""

  def __init__(self, a, b):
    self.a, self.b = a, b

  def tree_flatten(self):
    return (self.a, self.b), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)


@dataclasses.dataclass
class Layer:
  """A registered dataclass with a static (non-array) field."""

  w: object
  name: str = "layer"


jax.tree_util.register_dataclass(Layer, data_fields=["w"], meta_fields=["name"])

# Global norm of each step's tree (steps 5 and 8 are spikes), and the step
# where one leaf alone jumps (a per-tensor spike for AdaGC).
TARGETS = [1.0, 1.2, 0.9, 1.1, 1.0, 8.0, 1.05, 0.95, 20.0, 1.0, 1.1, 0.9]
LEAF_SPIKE_AT = 7
STEPS = len(TARGETS)


def _base_leaves():
  rng = np.random.default_rng(7)
  return dict(
      f32=rng.standard_normal((4, 3)), bf16=rng.standard_normal(6),
      f16=300.0 * rng.standard_normal((2, 3)),  # squares overflow float16
      c64=rng.standard_normal(3) + 1j * rng.standard_normal(3),
      scalar=rng.standard_normal(()), scalar16=rng.standard_normal(()),
      nest_a=rng.standard_normal(2), nest_deep=rng.standard_normal((3, 1)),
      pair_a=rng.standard_normal(5), pair_b=rng.standard_normal((2, 2)),
      layer_w=rng.standard_normal(3))


DTYPES = dict(f32=jnp.float32, bf16=jnp.bfloat16, f16=jnp.float16,
              c64=jnp.complex64, scalar=jnp.float32, scalar16=jnp.float16,
              nest_a=jnp.float32, nest_deep=jnp.bfloat16, pair_a=jnp.float32,
              pair_b=jnp.bfloat16, layer_w=jnp.float32)


def _tree(t):
  base = _base_leaves()
  total = np.sqrt(sum(np.sum(np.abs(v) ** 2) for v in base.values()))
  leaves = {k: jnp.asarray(v * TARGETS[t] / total).astype(DTYPES[k])
            for k, v in base.items()}
  if t == LEAF_SPIKE_AT:
    leaves["pair_a"] = leaves["pair_a"] * 10
  return {
      "f32": leaves["f32"], "bf16": leaves["bf16"], "f16": leaves["f16"],
      "c64": leaves["c64"],
      "empty": jnp.zeros((0,), jnp.float32),
      "empty2d": jnp.zeros((3, 0), jnp.bfloat16),
      "scalar": leaves["scalar"], "scalar16": leaves["scalar16"],
      "nested": [(leaves["nest_a"], {"deep": leaves["nest_deep"]}), []],
      "pair": Pair(leaves["pair_a"], leaves["pair_b"]),
      "layer": Layer(leaves["layer_w"], name="dense"),
  }


def _leaves64(tree):
  return [np.asarray(x).astype(np.complex128 if jnp.iscomplexobj(x)
                               else np.float64)
          for x in jax.tree.leaves(tree)]


def _norm64(leaves):
  return float(np.sqrt(sum(np.sum(np.abs(x) ** 2) for x in leaves)))


RTOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.complex64): 1e-5,
        jnp.dtype(jnp.float16): 2e-3, jnp.dtype(jnp.bfloat16): 1e-2}


def _transform_and_reference(name):
  """The transform, its reference, and a function from float64 leaves to
  the reference's scales."""
  e = TRANSFORMS[name]
  ref = e.reference()
  return e.make(), ref, lambda leaves: ref.step([np.abs(x) for x in leaves])


def _assert_state_dtypes(state, init):
  """Statistics in float32, counters in int32, whatever the tree holds: the
  dtypes of ``init`` (made from the tree), which are those two."""
  for (path, x), x0 in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                           jax.tree.leaves(init), strict=True):
    where = jax.tree_util.keystr(path)
    assert x.dtype == x0.dtype in (jnp.int32, jnp.float32), where
  for f in ("grad_norm", "clipped_norm"):
    assert getattr(state, f).dtype == jnp.float32, f
  for f in ("count", "nonfinite_count"):
    assert getattr(state, f).dtype == jnp.int32, f


@pytest.mark.parametrize("name", CLIPPERS)
def test_odd_tree_structure_dtypes_norm_and_scales(name):
  kind = TRANSFORMS[name].kind
  tx, ref, ref_scales = _transform_and_reference(name)
  state = init = tx.init(_tree(0))
  update = jax.jit(tx.update)
  clipped_steps = 0
  for t in range(STEPS):
    grads = _tree(t)
    out, state = update(grads, state)
    # Structure, static fields, dtypes and shapes are kept.
    assert jax.tree.structure(out) == jax.tree.structure(grads)
    assert isinstance(out["pair"], Pair) and out["layer"].name == "dense"
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(grads),
                    strict=True):
      assert x.dtype == y.dtype and x.shape == y.shape
    # Statistics in float32 (int32 counters).
    _assert_state_dtypes(state, init)
    # The norm, accumulated in float32, is the float64 norm.
    leaves = _leaves64(grads)
    np.testing.assert_allclose(float(state.grad_norm), _norm64(leaves),
                               rtol=2e-6, err_msg=t)
    # Each leaf scaled as the reference says.
    scales = ref_scales(leaves)
    for x, x64, s in zip(jax.tree.leaves(out), leaves, scales,
                         strict=True):
      np.testing.assert_allclose(
          np.asarray(x).astype(x64.dtype), x64 * s, rtol=RTOL[x.dtype],
          atol=1e-7, err_msg=f"step {t} {x.dtype}{x.shape}")
    np.testing.assert_allclose(
        float(state.clipped_norm),
        _norm64([x * s for x, s in zip(leaves, scales, strict=True)]),
        rtol=1e-5)
    clipped_steps += min(scales) < 1
  assert (int(state.count), int(state.nonfinite_count)) == (STEPS, 0)
  assert clipped_steps >= 2 if TRANSFORMS[name].clips else clipped_steps == 0
  if kind == "zclip":
    assert int(state.spike_count) == ref.model.spikes == 2
  if kind == "clip":
    assert int(state.clipped_count) == clipped_steps
  if kind == "adagc":
    # gamma: the gradient's structure, one float32 scalar per leaf (inf for
    # the empty leaves, which never had a non-zero norm).
    assert jax.tree.structure(state.gamma) == jax.tree.structure(_tree(0))
    gammas = jax.tree.leaves(state.gamma)
    assert all(g.dtype == jnp.float32 and g.shape == () for g in gammas)
    np.testing.assert_allclose(np.asarray(gammas, np.float64),
                               ref.model.gamma, rtol=1e-4)
    assert sum(np.isinf(ref.model.gamma)) == 2


@pytest.mark.parametrize("name", CLIPPERS)
def test_a_tree_of_only_empty_and_none_leaves(name):
  tx, _, _ = _transform_and_reference(name)
  tree = {"a": jnp.zeros((0,), jnp.bfloat16), "b": None,
          "c": [jnp.zeros((3, 0), jnp.float16)], "d": Pair(None, None)}
  state = init = tx.init(tree)
  for _ in range(5):
    out, state = jax.jit(tx.update)(tree, state)
  assert jax.tree.structure(out) == jax.tree.structure(tree)
  assert out["a"].dtype == jnp.bfloat16 and out["c"][0].shape == (3, 0)
  assert float(state.grad_norm) == 0.0 and float(state.clipped_norm) == 0.0
  assert int(state.count) == 5 and int(state.nonfinite_count) == 0
  _assert_state_dtypes(state, init)
  # No NaN or Inf from 0 / 0: what was finite at init still is (AdaGC's
  # gamma of a leaf never seen stays inf, a threshold of None is inf).
  for (path, x), x0 in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                           jax.tree.leaves(init), strict=True):
    assert np.all(np.isfinite(np.asarray(x))
                  | ~np.isfinite(np.asarray(x0))), jax.tree_util.keystr(path)
