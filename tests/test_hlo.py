"""The clipping fuses into AdamW's own pass: checked on the compiled HLO.

Each transform's only per-element work should be one read of the gradients
(the norms) and a multiply by a scalar folded into the optimizer's fusions:
no extra gradient-sized buffer, no per-element divide or select. The count
of such operations in the compiled step is compared with bare AdamW's.

The second pass that recomputes a norm whose float32 sum of squares
overflowed must stay inside a conditional branch, so that a normal step
reads the gradients once for the norms, as checked here too.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from transforms import CLIPPERS, TRANSFORMS, no_loss, with_adamw
from versions import measured_on

import optax_zclip
from optax_zclip import _numerics

SHAPES = {"a": (96, 160), "b": (224,), "c": (3, 40, 72)}

# What XLA fuses, and how it writes it, changes between releases: the tests
# that count operations of a kind in the text are measurements. (Those that
# compare two steps' structures hold on every release and run everywhere.)
HLO_MEASURED = measured_on("0.10.2", "0.12.0.1",
                           "XLA's fusion decisions in the compiled HLO text")


def _compiled_text(tx):
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, params).compile().as_text()


def _counts(text):
  out = {}
  entry = text[text.index("\nENTRY"):]
  for s in SHAPES.values():
    dims = re.escape(",".join(map(str, s)))
    ty = rf"f32\[{dims}\]"
    out[s] = {
        # Gradient-sized buffers the step materialises.
        "buffers": len(re.findall(rf"= {ty}\S* fusion\(", entry)),
        "divide": len(re.findall(rf"= {ty}\S* divide\(", text)),
        # Elementwise selects over the leaf (of its values or predicates).
        "select": len(re.findall(rf"= (?:f32|pred)\[{dims}\]\S* select\(",
                                 text)),
        "multiply": len(re.findall(rf"= {ty}\S* multiply\(", text)),
    }
  return out


BARE = _counts(_compiled_text(optax.adamw(1e-3)))


def _clipper(name):
  """The registry's clipping transform ``name``, or ZClip's "mean" option."""
  if name == "zclip_mean":
    return optax_zclip.zclip(max_grad_norm=None, clip_option="mean")
  return TRANSFORMS[name].make()


# Every clipping transform of the registry (measure_only among them: a norm
# must not add a pass; XLA:CPU would merge its squares with AdamW's and write
# them out if the scale were dropped), and ZClip's "mean" option.
@HLO_MEASURED
@pytest.mark.parametrize("name", [*CLIPPERS, "zclip_mean"])
def test_scaling_fuses_into_adamw(name):
  got = _counts(_compiled_text(optax.chain(_clipper(name),
                                           optax.adamw(1e-3))))
  for shape, bare in BARE.items():
    c = got[shape]
    # XLA:CPU may square a tiny leaf into a buffer of its own before the
    # reduction; for real-sized leaves the square fuses into the reduce.
    if np.prod(shape) >= 8192:
      assert c["buffers"] == bare["buffers"], (shape, c, bare)
    assert c["divide"] == bare["divide"], (shape, c, bare)
    assert c["select"] == bare["select"], (shape, c, bare)
    assert c["multiply"] > bare["multiply"], (shape, c, bare)  # the scale



def test_the_check_sees_an_unfused_clip():
  # optax.clip_by_global_norm selects and divides per element and
  # materialises the clipped gradient: the counts above must notice.
  got = _counts(_compiled_text(optax.chain(optax.clip_by_global_norm(1.0),
                                           optax.adamw(1e-3))))
  shape = SHAPES["a"]
  assert got[shape]["divide"] > BARE[shape]["divide"]
  assert got[shape]["buffers"] > BARE[shape]["buffers"]


def _computation(text, name):
  """The body of the computation called ``name`` ("ENTRY" for the entry)."""
  start = text.index("\nENTRY" if name == "ENTRY" else f"\n{name} (")
  return text[start:text.index("\n}", start)]


def _gradient_reads(text):
  """Per leaf, the instructions of the entry computation that read it.

  A tuple only passes its elements on (to a conditional, whose branches run
  only when taken), so it is not counted.
  """
  lines = [line for line in _computation(text, "ENTRY").splitlines()
           if " parameter(" not in line and " tuple(" not in line]
  return {k: sum(bool(re.search(rf"%grads__{k}__\.\d+\b", line))
                 for line in lines) for k in SHAPES}


BARE_READS = _gradient_reads(_compiled_text(optax.adamw(1e-3)))


def _max_abs_unconditionally():
  """A transform that also takes every element's magnitude on every step:
  what the overflow check must not do (the sanity check of the test)."""

  def update(updates, state, params=None):
    del params
    big = jnp.max(jnp.stack([jnp.max(jnp.abs(x))
                             for x in jax.tree.leaves(updates)]))
    scale = 1.0 / jnp.maximum(_numerics.global_norm(updates), big)
    return _numerics.scale_tree(updates, scale), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


# The whole train step: forward, backward, clipping and AdamW in one jit.
MLP = {"w1": (96, 160), "w2": (160, 96)}


def _train_step_buffers(tx, with_value=False):
  """Gradient-sized arrays the compiled train step writes, by opcode."""
  params = {k: jnp.zeros(s) for k, s in MLP.items()}
  state = tx.init(params)
  x = jnp.ones((32, 96))

  def loss_fn(p):
    return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - x) ** 2)

  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    extra = {"value": loss} if with_value else {}
    updates, state = tx.update(grads, state, params, **extra)
    return (optax.apply_updates(params, updates), state,
            optax_zclip.stats(state))

  text = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state).compile().as_text()
  entry = text[text.index("\nENTRY"):]
  out = {}
  for s in MLP.values():
    dims = re.escape(",".join(map(str, s)))
    ty = rf"f32\[{dims}\]"
    for op in ("fusion", "copy"):
      out[op] = out.get(op, 0) + len(re.findall(rf"= {ty}\S* {op}\(", entry))
  return out


BARE_STEP = _train_step_buffers(optax.adamw(1e-3))


@HLO_MEASURED
@pytest.mark.parametrize("name", CLIPPERS)
def test_a_normal_step_reads_the_gradients_once_for_the_norms(name):
  text = _compiled_text(optax.chain(TRANSFORMS[name].make(),
                                    optax.adamw(1e-3)))
  # The rescaled pass is a conditional's branch, not unconditional work...
  calls = re.findall(r" conditional\(.*branch_computations=\{([^}]*)\}",
                     _computation(text, "ENTRY"))
  assert len(calls) == 1, calls
  branches = [_computation(text, name.strip())
              for name in calls[0].split(",")]
  # ...and that branch does read every gradient, for a sum of squares.
  assert any(
      "branch_1_fun/reduce" in body and all(
          re.search(rf"f32\[{','.join(map(str, s))}\]\S* get-tuple-element",
                    body) for s in SHAPES.values())
      for body in branches), branches
  reads = _gradient_reads(text)
  for k in SHAPES:
    assert reads[k] == BARE_READS[k] + 1, (k, reads, BARE_READS)


@HLO_MEASURED
def test_the_read_count_sees_an_extra_pass():
  reads = _gradient_reads(_compiled_text(optax.chain(
      _max_abs_unconditionally(), optax.adamw(1e-3))))
  for k in SHAPES:
    assert reads[k] == BARE_READS[k] + 2, (k, reads, BARE_READS)


@HLO_MEASURED
@pytest.mark.parametrize("name", CLIPPERS)
def test_whole_train_step_adds_no_buffer(name):
  # The norm reads the weight gradients where the backward pass's dots wrote
  # them and the scale folds into AdamW: no fusion and no copy beyond bare
  # AdamW's. (Bare AdamW even copies a weight that the backward pass still
  # reads after its gradient is ready; behind a global norm the update waits
  # for every gradient, so XLA needs no copy.)
  got = _train_step_buffers(optax.chain(TRANSFORMS[name].make(),
                                        optax.adamw(1e-3)))
  assert got["fusion"] == BARE_STEP["fusion"], (got, BARE_STEP)
  assert got["copy"] <= BARE_STEP["copy"], (got, BARE_STEP)


def test_whole_train_step_sees_optax_clip():
  got = _train_step_buffers(optax.chain(optax.clip_by_global_norm(1.0),
                                        optax.adamw(1e-3)))
  assert got["fusion"] > BARE_STEP["fusion"], (got, BARE_STEP)


def test_whole_train_step_skip_spikes_adds_no_copy():
  got = _train_step_buffers(
      optax_zclip.skip_spikes(optax.chain(optax_zclip.zclip(),
                                          optax.adamw(1e-3))), True)
  assert got["copy"] <= BARE_STEP["copy"], (got, BARE_STEP)


def _distinct_computations(tx, leaves, **extra):
  """How many different computations the compiled step of ``tx`` holds, on
  ``leaves`` bf16 leaves of one shape (names, metadata and the parameter
  names left out, so that two leaves' identical kernels count once);
  ``extra``: the update's other arguments."""
  params = [jnp.zeros((8, 16), jnp.bfloat16) for _ in range(leaves)]
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  text = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, params).compile().as_text()
  bodies = set()
  for block in text.split("\n\n"):
    lines = block.strip().split("\n")
    if not re.match(r"%\S+ \(", lines[0]):
      continue  # ENTRY, and what is not a computation
    head = re.sub(r"[\w.\-]+: ", "", lines[0].split(" ", 1)[1])
    body = re.sub(r"%[\w.\-]+", "%", "\n".join(lines[1:]))
    body = re.sub(r", metadata=\{[^}]*\}", "", body)
    bodies.add(head + body)
  return len(bodies)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_leaves_of_one_shape_share_their_kernels(name):
  # XLA compiles a computation once for every leaf it fits, so compile time
  # grows with the number of distinct kernels. A per-leaf value sliced out
  # of a vector of all the leaves' norms (AdaGC did, before 0.2.0) puts a
  # different index into each leaf's kernel: the count would grow with the
  # leaves: by 6 from 4 to 10 leaves. The computations over the vector of
  # all the norms (their stack, their sum) have a shape that depends on the
  # number of leaves, and XLA may split or merge one of them differently.
  tx = with_adamw(name, 1e-3)
  # No loss in this step: a wrapper's norm test alone, asked for.
  few, many = (_distinct_computations(tx, n, **no_loss(name))
               for n in (4, 10))
  assert abs(many - few) <= 2


def test_the_kernel_count_sees_a_per_leaf_slice():
  # The same count for a transform that scales each leaf by its entry of a
  # vector computed from all the leaves: it grows with the leaves.
  def update(updates, state, params=None):
    del params
    norms = _numerics.leaf_norms(updates)
    scales = 1.0 / (norms + jnp.sum(norms))
    return [_numerics.scale_leaf(x, s)
            for x, s in zip(updates, scales, strict=True)], state

  tx = optax.chain(
      optax.GradientTransformation(lambda p: optax.EmptyState(), update),
      optax.adamw(1e-3))
  few, many = _distinct_computations(tx, 4), _distinct_computations(tx, 10)
  assert many > few + 4
