"""`migrate_state`: a checkpoint from before a state gained fields restores.

0.2.0 added ``capped`` and ``cap_count`` to `ZClipState` and `AdaGCState`.
A checkpoint written before, in the old layout (the same NamedTuples without
those fields, which Orbax writes as mappings of their field names), is
restored without a target and upgraded with `migrate_state`; the run then
goes on bit for bit as the uninterrupted one, and the added counters count
from the restore, as the float64 references count them.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from references import SEQ, AdaGCRef, ZClipRef, tree_norm64

import optax_zclip

# The fields of the states as releases before 0.2.0 wrote them.
OLD_FIELDS = {
    "zclip": ("count", "mean", "var", "grad_norm", "clipped_norm", "z_score",
              "threshold", "spike_count", "nonfinite_count",
              "consecutive_spikes", "restart_count"),
    "adagc": ("count", "gamma", "grad_norm", "clipped_norm", "num_clipped",
              "nonfinite_count"),
}
MAKERS = {"zclip": functools.partial(optax_zclip.zclip, warmup_steps=5),
          "adagc": functools.partial(optax_zclip.adagc, warmup_steps=20)}
SAVE_AT, STEPS = 12, 40


def _old_layout(kind, state):
  """The clipping state as the previous release's class held it."""
  old = collections.namedtuple(type(state).__name__, OLD_FIELDS[kind])
  return old(**{f: getattr(state, f) for f in OLD_FIELDS[kind]})


def _params():
  return {k: jnp.linspace(-1.0, 1.0, v.size).reshape(v.shape)
          for k, v in SEQ[0].items()}


def _train_step(tx):
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _save(path, tree):
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
    ckptr.wait_until_finished()


def _restore_as_saved(path):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


@pytest.mark.parametrize("kind", ["zclip", "adagc"])
def test_an_old_checkpoint_restores_and_trains_on(kind, tmp_path):
  tx = optax.chain(MAKERS[kind](), optax.adamw(1e-2))
  step = _train_step(tx)
  params, state = _params(), tx.init(_params())
  for grads in SEQ[:SAVE_AT]:
    params, state = step(params, state, grads)
  path = tmp_path / "old"
  _save(path, {"params": params,
               "opt_state": (_old_layout(kind, state[0]), state[1])})
  at_save = int(state[0].cap_count)

  restored = _restore_as_saved(path)
  with pytest.raises(ValueError):  # today's layout cannot be the target
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.restore(path, jax.eval_shape(
          lambda: {"params": _params(), "opt_state": tx.init(_params())}))
  new = optax_zclip.migrate_state(restored["opt_state"], tx.init(_params()))
  assert type(new[0]) is type(state[0])
  assert jax.tree.structure(new) == jax.tree.structure(state)
  assert int(new[0].cap_count) == 0 and int(new[0].capped) == 0
  for f in OLD_FIELDS[kind]:
    assert _bits(getattr(new[0], f)) == _bits(getattr(state[0], f)), f
  assert _bits(new[1]) == _bits(state[1])

  p1, s1 = params, state
  p2, s2 = restored["params"], new
  for grads in SEQ[SAVE_AT:STEPS]:
    p1, s1 = step(p1, s1, grads)
    p2, s2 = step(p2, s2, grads)
  assert _bits(p2) == _bits(p1)
  for f in type(s1[0])._fields:
    if f != "cap_count":
      assert _bits(getattr(s2[0], f)) == _bits(getattr(s1[0], f)), f
  assert _bits(s2[1]) == _bits(s1[1])
  # The added counter counts from the restore: the cap's clips after it, as
  # the float64 reference, fed the whole run, counts them.
  ref = ZClipRef(warmup_steps=5) if kind == "zclip" else AdaGCRef(
      warmup_steps=20)
  for t, grads in enumerate(SEQ[:STEPS]):
    if kind == "zclip":
      ref.step(tree_norm64(grads.values()))
    else:
      ref.step([np.asarray(x, np.float64) for x in grads.values()])
    if t == SAVE_AT - 1:
      assert ref.cap_count == at_save
  assert at_save >= 5 and ref.cap_count > at_save
  assert int(s2[0].cap_count) == ref.cap_count - at_save
  assert int(s1[0].cap_count) == ref.cap_count


def test_a_checkpoint_of_another_optimizer_is_refused(tmp_path):
  tx = optax.chain(optax_zclip.zclip(), optax.adamw(1e-2))
  state = tx.init(_params())
  _save(tmp_path / "a", {"opt_state": (_old_layout("zclip", state[0]),
                                       state[1])})
  restored = _restore_as_saved(tmp_path / "a")["opt_state"]
  # Another optimizer after ZClip: AdamW's moments have no place in SGD's.
  sgd = optax.chain(optax_zclip.zclip(), optax.sgd(0.1, momentum=0.9))
  with pytest.raises(ValueError, match=r"migrate_state: the checkpoint has "
                     r"no 1/0/trace/b1, 1/0/trace/w1"):
    optax_zclip.migrate_state(restored, sgd.init(_params()))
  # Other params: a shape that differs.
  other = {k: jnp.zeros([*v.shape, 2]) for k, v in _params().items()}
  with pytest.raises(ValueError, match=r"1/0/mu/\w+ has shape"):
    optax_zclip.migrate_state(restored, tx.init(other))
  # A checkpoint without ZClip: its fields cannot be filled in.
  bare = optax.adamw(1e-2)
  with pytest.raises(ValueError, match=r"no 0/count, 0/mean, 0/var and "):
    optax_zclip.migrate_state(
        [bare.init(_params())],
        optax.chain(optax_zclip.zclip(), bare).init(_params()))
  # A state with leaves the template does not have.
  with pytest.raises(ValueError, match=r"holds 1/0/count, 1/0/mu/b1, "
                     r"1/0/mu/w1 and 4 more"):
    optax_zclip.migrate_state(restored, optax.chain(
        optax_zclip.zclip(), optax.sgd(0.1)).init(_params()))


@pytest.mark.examples
def test_an_old_nnx_checkpoint_restores_into_the_optimizer(tmp_path):
  from flax import nnx  # noqa: PLC0415 (the examples extra)

  def make():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = optax.chain(optax_zclip.zclip(warmup_steps=3), optax.adamw(1e-2))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x):
    grads = nnx.grad(lambda m: 40.0 * jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
        for _ in range(12)]
  model, optimizer = make()
  for x in xs[:6]:
    train_step(model, optimizer, x)
  old = nnx.state(optimizer)  # as the previous release's optimizer held it
  for f in ("capped", "cap_count"):
    del old["opt_state"][0][f]
  _save(tmp_path / "nnx", {"model": nnx.state(model), "optimizer": old})

  # The whole checkpoint in one call: the model's weights need no change.
  restored = _restore_as_saved(tmp_path / "nnx")
  model2, optimizer2 = make()
  template = {"model": nnx.state(model2), "optimizer": nnx.state(optimizer2)}
  new = optax_zclip.migrate_state(restored, template)
  nnx.update(model2, new["model"])
  nnx.update(optimizer2, new["optimizer"])
  for x in xs[6:]:
    train_step(model, optimizer, x)
    train_step(model2, optimizer2, x)
  assert _bits(nnx.state(model2)) == _bits(nnx.state(model))
  s1, s2 = optax_zclip.stats(optimizer), optax_zclip.stats(optimizer2)
  assert int(s1["zclip/count"]) == int(s2["zclip/count"]) == 12
  assert int(s1["zclip/cap_count"]) == 12
  assert int(s2["zclip/cap_count"]) == 6
