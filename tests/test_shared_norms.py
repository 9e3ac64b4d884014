"""`optax_zclip._shared_norms`: the norms skip_spikes hands to the clip at the
head of its chain. (That the clip takes them in a real step, and that the
step reads the gradients once: tests/test_skip.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_zclip import _shared_norms


def test_offered_norms_match_the_same_arrays_and_axis_only():
  tree = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}
  marked = [jnp.float32(-1.0), jnp.float32(-2.0)]
  with _shared_norms.offered(tree, None, marked):
    assert _shared_norms.leaf_norm_list(tree) == marked
    # Equal values in other arrays, or another axis: computed.
    copy = jax.tree.map(jnp.array, tree)
    np.testing.assert_array_equal(_shared_norms.leaf_norm_list(copy), [5, 12])
    with pytest.raises(NameError):  # a psum over an unbound axis
      _shared_norms.leaf_norm_list(tree, "batch")
    # A function traced again on new arrays for the same values.
    new = [jnp.array([3.0, 4.0]), jnp.array([[12.0]])]
    with _shared_norms.carried(jax.tree.leaves(tree), new):
      assert _shared_norms.leaf_norm_list({"a": new[0], "b": new[1]}) == marked
    assert len(_shared_norms._offered()) == 1  # noqa: SLF001
  np.testing.assert_array_equal(_shared_norms.leaf_norm_list(tree), [5, 12])


def test_global_norm_is_the_float64_norm_of_the_leaves():
  tree = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]], jnp.bfloat16)}
  want = np.sqrt(9.0 + 16.0 + 144.0)
  assert float(_shared_norms.global_norm(tree)) == pytest.approx(want,
                                                                 rel=1e-7)
  marked = [jnp.float32(6.0), jnp.float32(8.0)]
  with _shared_norms.offered(tree, None, marked):
    assert float(_shared_norms.global_norm(tree)) == 10.0


def test_a_leaf_that_is_not_floating_point_is_refused_even_if_offered():
  tree = {"a": jnp.array([3, 4])}
  with _shared_norms.offered(tree, None, [jnp.float32(5.0)]):
    with pytest.raises(ValueError, match="dtype int32"):
      _shared_norms.leaf_norm_list(tree)
