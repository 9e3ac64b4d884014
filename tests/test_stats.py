"""`optax_zclip.stats` finds the ZClip state in any optimizer nesting."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references import SEQ, ZClipRef, tree_norm64
from transforms import CLIPPERS, KINDS, TRANSFORMS

import optax_zclip

# ZClip's keys in stats(): always `zclip/<field>`, whatever wraps it.
KEYS = {"zclip/count", "zclip/mean", "zclip/var", "zclip/std",
        "zclip/grad_norm", "zclip/clipped_norm", "zclip/z_score",
        "zclip/threshold", "zclip/spike_count", "zclip/nonfinite_count",
        "zclip/restart_count", "zclip/capped", "zclip/cap_count"}


def _check_against_reference(s, ref, grads, scale):
  """The logged values equal the float64 reference's view of the last step."""
  assert set(s) == KEYS
  g = tree_norm64(jax.tree.leaves(grads))
  mean, var = ref.running_stats()
  np.testing.assert_allclose(s["zclip/grad_norm"], g, rtol=1e-5)
  np.testing.assert_allclose(s["zclip/clipped_norm"], g * scale, rtol=1e-4)
  np.testing.assert_allclose(s["zclip/mean"], mean, rtol=1e-4)
  np.testing.assert_allclose(s["zclip/std"], np.sqrt(var), rtol=1e-3)
  assert int(s["zclip/spike_count"]) == ref.spikes
  for k, v in s.items():
    assert v.shape == (), k
    assert v.dtype == (jnp.int32 if k.endswith(("count", "capped"))
                       else jnp.float32), k


def _wrappers():
  zc = dict(warmup_steps=5, max_grad_norm=2.2)
  return {
      "bare": optax_zclip.zclip(**zc),
      "chain": optax.chain(optax_zclip.zclip(**zc), optax.adamw(1e-3)),
      "inject": optax.chain(
          optax.inject_hyperparams(optax_zclip.zclip)(**zc),
          optax.adamw(1e-3)),
      "inject_outer": optax.inject_hyperparams(
          lambda learning_rate: optax.chain(
              optax_zclip.zclip(**zc), optax.adamw(learning_rate)))(1e-3),
      "apply_if_finite": optax.apply_if_finite(
          optax.chain(optax_zclip.zclip(**zc), optax.sgd(0.1)), 3),
  }


@pytest.mark.parametrize("name", list(_wrappers()))
def test_stats_inside_wrappers_under_jit(name):
  tx = _wrappers()[name]
  params = {k: jnp.zeros(v.shape) for k, v in SEQ[0].items()}
  state = tx.init(params)

  @jax.jit
  def step(grads, state):
    _, state = tx.update(grads, state, params)
    return state, optax_zclip.stats(state)

  ref = ZClipRef(warmup_steps=5, max_grad_norm=2.2)
  for grads in SEQ[:40]:
    state, s = step(grads, state)
    scale = ref.step(tree_norm64(grads.values()))["scale"]
  assert ref.spikes >= 1
  _check_against_reference(s, ref, grads, scale)


def test_stats_inside_multisteps_sees_the_accumulated_gradient():
  k = 3
  tx = optax.MultiSteps(
      optax.chain(optax_zclip.zclip(warmup_steps=4), optax.sgd(0.1)), k)
  params = {key: jnp.zeros(v.shape) for key, v in SEQ[0].items()}
  state = tx.init(params)
  step = jax.jit(tx.update)
  ref = ZClipRef(warmup_steps=4)
  for i in range(0, 60, k):
    micro = SEQ[i: i + k]
    for grads in micro:
      _, state = step(grads, state, params)
    mean_grads = {key: np.mean([m[key] for m in micro], axis=0,
                               dtype=np.float64) for key in micro[0]}
    scale = ref.step(tree_norm64(mean_grads.values()))["scale"]
  s = optax_zclip.stats(state)
  assert int(s["zclip/count"]) == 20  # one statistic per real step, not micro
  _check_against_reference(s, ref, mean_grads, scale)


def test_several_clipping_states_are_prefixed_by_their_path():
  tx = optax.multi_transform(
      {"a": optax_zclip.zclip(warmup_steps=2, max_grad_norm=None),
       "b": optax_zclip.zclip(warmup_steps=2, max_grad_norm=None)},
      {"x": "a", "y": "b"})
  params = {"x": jnp.zeros(2), "y": jnp.zeros(3)}
  state = tx.init(params)
  _, state = tx.update({"x": jnp.array([3.0, 4.0]), "y": jnp.ones(3)}, state)
  s = optax_zclip.stats(state)
  assert len(s) == 2 * len(KEYS)
  np.testing.assert_allclose(
      [s["zclip[inner_states.a.inner_state]/grad_norm"],
       s["zclip[inner_states.b.inner_state]/grad_norm"]],
      [5.0, np.sqrt(3.0)], rtol=1e-6)


def test_no_clipping_state_gives_an_empty_dict_or_the_default():
  state = optax.adamw(1e-3).init({"w": jnp.zeros(2)})
  assert optax_zclip.stats(state) == {}
  assert jax.jit(optax_zclip.stats)(state) == {}
  fallback = {"zclip/grad_norm": jnp.zeros([])}
  assert optax_zclip.stats(state, default=fallback) is fallback


# --- The telemetry contract: any declared state, in any nesting. -----------


@optax_zclip.loggable_state("maxabs", fields=("count", "max_abs"),
                            derived={"twice": lambda s: 2 * s["max_abs"]})
class _MaxAbsState(NamedTuple):
  """A toy transform's state, declared here and nowhere else."""

  count: jax.Array
  max_abs: jax.Array
  history: jax.Array  # not declared: stats() must leave it out


def _max_abs():
  def init_fn(params):
    del params
    return _MaxAbsState(jnp.zeros([], jnp.int32), jnp.zeros([]),
                        jnp.zeros([4]))

  def update_fn(updates, state, params=None):
    del params
    m = jnp.max(jnp.stack([jnp.max(jnp.abs(x))
                           for x in jax.tree.leaves(updates)]))
    return updates, _MaxAbsState(state.count + 1, m,
                                 state.history.at[state.count % 4].set(m))

  return optax.GradientTransformation(init_fn, update_fn)


# Each kind of state, its keys in stats() (written out: they are public API,
# what dashboards are keyed on).
_KEYS = {
    "zclip": KEYS,
    "adagc": {"adagc/count", "adagc/grad_norm", "adagc/clipped_norm",
              "adagc/num_clipped", "adagc/nonfinite_count", "adagc/capped",
              "adagc/cap_count"},
    "autoclip": {"autoclip/count", "autoclip/grad_norm",
                 "autoclip/clipped_norm", "autoclip/threshold",
                 "autoclip/nonfinite_count"},
    "clip": {"clip/count", "clip/grad_norm", "clip/clipped_norm",
             "clip/threshold", "clip/clipped_count", "clip/nonfinite_count"},
    "maxabs": {"maxabs/count", "maxabs/max_abs", "maxabs/twice"},
}
# `skip_spikes`'s own keys, reported next to those of the states it wraps.
SKIP_KEYS = {"skip/size", "skip/skipped", "skip/skip_count",
             "skip/nonfinite_count", "skip/grad_norm", "skip/loss_threshold",
             "skip/norm_threshold"}

# Every declared state's transform: the registry's clipping transforms, by
# their entry's name, and the toy declared here.
DECLARED = [*CLIPPERS, "maxabs"]


def make_declared(name):
  """The transform of ``name`` (one of `DECLARED`)."""
  return _max_abs() if name == "maxabs" else TRANSFORMS[name].make()


def _kind(name):
  return "maxabs" if name == "maxabs" else KINDS[name]


def _nest(kind, make):
  if kind == "chain":
    return optax.chain(make(), optax.adamw(1e-3))
  if kind == "inject":
    return optax.chain(optax.inject_hyperparams(lambda: make())(),
                       optax.adamw(1e-3))
  if kind == "inject_outer":
    return optax.inject_hyperparams(
        lambda learning_rate: optax.chain(make(), optax.adamw(learning_rate))
    )(1e-3)
  if kind == "multisteps":
    return optax.MultiSteps(optax.chain(make(), optax.adamw(1e-3)), 2)
  if kind == "apply_if_finite":
    return optax.apply_if_finite(optax.chain(make(), optax.adamw(1e-3)), 3)
  if kind == "multi_transform":
    # One group holds the clipping state, the other none.
    return optax.multi_transform(
        {"clipped": optax.chain(make(), optax.adamw(1e-3)),
         "frozen": optax.set_to_zero()},
        {"a": "clipped", "b": "clipped", "c": "frozen"})
  raise AssertionError(kind)


def nesting_grads():
  """Four steps' gradients of a two-leaf tree, the same in every nesting."""
  rng = np.random.default_rng(7)
  return [{"a": rng.standard_normal(3).astype(np.float32) * 2,
           "b": rng.standard_normal((2, 2)).astype(np.float32) * 2}
          for _ in range(4)]


@pytest.mark.parametrize("kind", ["chain", "inject", "inject_outer",
                                  "multisteps", "apply_if_finite",
                                  "multi_transform"])
@pytest.mark.parametrize("name", DECLARED)
def test_every_declared_state_is_found_in_every_nesting(name, kind):
  grads = nesting_grads()
  tx = _nest(kind, lambda: make_declared(name))
  params = {k: jnp.zeros(v.shape) for k, v in grads[0].items()}
  if kind == "multi_transform":  # a frozen leaf next to the clipped ones
    params["c"] = jnp.zeros(5)
    grads = [{**g, "c": np.ones(5, np.float32)} for g in grads]
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in grads:
    _, state = step(g, state, params)
  s = jax.jit(optax_zclip.stats)(state)
  # MultiSteps hands the inner chain the mean of each pair of micro-steps;
  # the clipping state sees the leaves "a" and "b" only.
  seen = ({k: (grads[2][k].astype(np.float64) + grads[3][k]) / 2
           for k in ("a", "b")} if kind == "multisteps"
          else {k: grads[-1][k] for k in ("a", "b")})
  check_found(s, name, seen, 2 if kind == "multisteps" else 4)


def check_found(s, name, seen, real_steps):
  """``s`` has the keys of ``name``'s kind, the float64 norm of ``seen`` as
  its `grad_norm` (the toy: the max as its `max_abs`), and its count."""
  kind = _kind(name)
  assert set(s) == _KEYS[kind]
  if kind == "maxabs":
    expected = max(np.abs(v).max() for v in seen.values())
    np.testing.assert_allclose(s["maxabs/max_abs"], expected, rtol=1e-6)
    np.testing.assert_allclose(s["maxabs/twice"], 2 * expected, rtol=1e-6)
  else:
    np.testing.assert_allclose(s[f"{kind}/grad_norm"],
                               tree_norm64(seen.values()), rtol=1e-5)
  assert int(s[f"{kind}/count"]) == real_steps


@pytest.mark.parametrize("name", CLIPPERS)
def test_keys_are_prefixed_and_stay_the_same_when_the_chain_is_wrapped(name):
  make, kind = TRANSFORMS[name].make, KINDS[name]
  params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}

  def chain():
    return optax.chain(make(), optax.adamw(1e-3))

  alone = set(optax_zclip.stats(chain().init(params)))
  assert alone == _KEYS[kind]
  assert all(k.startswith(kind + "/") for k in alone), sorted(alone)
  wrapped = {
      "skip_spikes": optax_zclip.skip_spikes(chain(), window=4),
      "multisteps": optax.MultiSteps(chain(), 2),
      "apply_if_finite": optax.apply_if_finite(chain(), 3),
  }
  for how, tx in wrapped.items():
    keys = set(optax_zclip.stats(tx.init(params)))
    # Every key of the chain alone, under the same name; `skip_spikes`
    # adds its own.
    extra = SKIP_KEYS if how == "skip_spikes" else set()
    assert keys == _KEYS[kind] | extra, (how, sorted(keys))


def test_one_state_in_a_multi_transform_group_has_the_keys_it_has_alone():
  tx = optax.multi_transform(
      {"clipped": optax_zclip.zclip(warmup_steps=2), "rest": optax.sgd(0.1)},
      {"x": "clipped", "y": "rest"})
  state = tx.init({"x": jnp.zeros(2), "y": jnp.zeros(3)})
  # One ZClip state: no path, the same keys as a ZClip standing alone.
  assert set(optax_zclip.stats(state)) == KEYS


def test_a_plain_dict_with_the_same_keys_is_not_a_clipping_state():
  lookalike = {k: jnp.zeros([]) for k in optax_zclip.ZClipState._fields}
  opt = optax.adamw(1e-3).init({"w": jnp.zeros(3)})
  assert optax_zclip.stats({"metrics": lookalike, "opt": opt}) == {}
  # (The same fields as `nnx.state` renders a real ZClipState are found:
  # test_nnx.py.)


def test_a_declaration_must_name_real_fields():
  class _S(NamedTuple):
    a: jax.Array

  with pytest.raises(ValueError, match="not fields"):
    optax_zclip.loggable_state("s", fields=("b",))(_S)
  with pytest.raises(ValueError, match="same fields as ZClipState"):
    optax_zclip.loggable_state("z2", fields=("count",))(
        NamedTuple("Z2", [(f, jax.Array)
                          for f in optax_zclip.ZClipState._fields]))


def test_a_declaration_must_have_a_usable_kind():
  class _S(NamedTuple):
    a: jax.Array

  for bad in ["", "my/clip", "my[clip", "myclip]", None]:
    with pytest.raises(ValueError, match="non-empty string"):
      optax_zclip.loggable_state(bad, fields=("a",))
  # Another declared class's kind: its keys and this one's would collide.
  for taken in ["zclip", "adagc", "autoclip", "clip", "skip", "maxabs"]:
    with pytest.raises(ValueError, match="already the kind of"):
      optax_zclip.loggable_state(taken, fields=("a",))(_S)
  assert optax_zclip.stats({"s": _S(jnp.ones([]))}) == {}


def test_the_same_class_may_be_declared_again():
  # A module reloaded declares its classes again: same module and qualname,
  # same kind. The new class replaces the old one.
  again = optax_zclip.loggable_state(
      "maxabs", fields=("count", "max_abs"),
      derived={"twice": lambda s: 2 * s["max_abs"]})(
          type("_MaxAbsState", (_MaxAbsState,), {"__module__": __name__}))
  try:
    s = optax_zclip.stats({"o": again(jnp.ones([], jnp.int32),
                                      jnp.array(3.0), jnp.zeros([4]))})
    assert {k: float(v) for k, v in s.items()} == {
        "maxabs/count": 1.0, "maxabs/max_abs": 3.0, "maxabs/twice": 6.0}
  finally:
    optax_zclip.loggable_state(
        "maxabs", fields=("count", "max_abs"),
        derived={"twice": lambda s: 2 * s["max_abs"]})(_MaxAbsState)
