"""Every public transform of the package: the one list the suites share.

`TRANSFORMS` maps a name to an `Entry`: the transform built with small
warm-ups (so that a short run passes through warm-up and into the adaptive
rule), the kind its ``stats()`` keys carry, its float64 reference
(references.py) and the facts about it that a suite needs. Every test that
must hold for all transforms parametrizes over it (or over `CLIPPERS`, the
entries that clip the gradients themselves); `test_transforms_list.py`
checks that it lists every public factory, and that each registry-driven
suite runs every entry, so a new transform cannot be left out.

A transform that wraps the whole optimizer (`skip_spikes`) is listed with the
transform it wraps the chain of, and its `Entry.wrapper` says how it wraps
it; the helpers below find the chain's state and the telemetry in either
case.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import optax
from references import (
  AdaGCRef,
  AutoClipRef,
  ClipByGlobalNormRef,
  SkipSpikesRef,
  ZClipRef,
  tree_norm64,
)

import optax_zclip


class Reference:
  """An entry's float64 reference, fed one step's gradient leaves at a time.

  `step` takes the leaves (in ``jax.tree.leaves`` order, as float64 arrays;
  complex ones as their absolute values) and returns the factor the
  transform must multiply each leaf by. ``model`` is the reference model
  itself (`ZClipRef`, ...), for its own state; ``count`` and
  ``nonfinite_count`` are the steps whose global norm was finite and not, as
  every state counts them.
  """

  def __init__(self, model: Any, rule: Callable[..., Sequence[float]]):
    self.model, self._rule = model, rule
    self.count = self.nonfinite_count = 0

  def step(self, leaves) -> list[float]:
    leaves = [np.asarray(x, np.float64) for x in leaves]
    g = tree_norm64(leaves)
    if math.isfinite(g):
      self.count += 1
    else:
      self.nonfinite_count += 1
    return [float(s) for s in self._rule(self.model, leaves, g)]


def _global(pick: Callable[[Any], float]) -> Callable[..., list[float]]:
  """The rule of a transform with one factor for all leaves: ``pick`` it
  from the model's answer to the step's global norm."""
  return lambda model, leaves, g: [pick(model.step(g))] * len(leaves)


class Wrapper(NamedTuple):
  """How an entry's transform wraps the whole optimizer.

  Attributes:
    factory: the public factory, applied to ``chain(<the entry's
      transform>, adamw)``.
    config: its arguments here.
    model: its float64 reference model (references.py), built with
      ``config``.
  """

  factory: Callable[..., optax.GradientTransformation]
  config: dict
  model: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One transform of the registry, and what the suites need to know of it.

  Attributes:
    factory: the public factory.
    config: its arguments here; the float64 reference takes the same ones.
    kind: the kind of its state: its keys in ``stats()`` are
      ``<kind>/<field>``, wrapped or not.
    model: the float64 reference model (references.py), built with
      ``config``.
    rule: ``(model, leaves, global_norm) -> factor per leaf``, one step.
    per_tensor: each leaf gets its own factor (after warm-up), from its own
      norm; otherwise one factor scales the whole tree.
    clips: a norm far above the usual ones is brought down (False: the entry
      only measures, so a suite's "clipped" checks do not apply).
    scheduled: a numeric argument that `optax.inject_hyperparams` may be
      given a schedule for (None: none is).
    static_args: the arguments `optax.inject_hyperparams` must leave static
      (a window size that sets a shape).
    wrapper: for a transform that wraps the whole optimizer, how it does
      (None: it does not).
  """

  factory: Callable[..., optax.GradientTransformation]
  config: dict
  kind: str
  model: Callable[..., Any]
  rule: Callable[..., Sequence[float]]
  per_tensor: bool = False
  clips: bool = True
  scheduled: str | None = None
  static_args: tuple[str, ...] = ()
  wrapper: Wrapper | None = None

  @property
  def warmup(self) -> int:
    """Steps before the adaptive rule applies (0: from the first)."""
    return int(self.config.get("warmup_steps", 0))

  def make(self, **kwargs) -> optax.GradientTransformation:
    """The transform (not wrapped); ``kwargs`` such as ``axis_name``."""
    return self.factory(**self.config, **kwargs)

  def reference(self) -> Reference:
    """A fresh float64 reference of `make`'s transform."""
    return Reference(self.model(**self.config), self.rule)


_ZCLIP = dict(factory=optax_zclip.zclip, kind="zclip", model=ZClipRef,
              rule=_global(lambda r: r["scale"]), scheduled="z_thresh")
_CLIP = dict(factory=optax_zclip.clip_by_global_norm, kind="clip",
             model=ClipByGlobalNormRef, rule=_global(lambda r: r["scale"]))

TRANSFORMS = {
    "zclip": Entry(config=dict(warmup_steps=5), **_ZCLIP),
    "zclip_no_cap": Entry(config=dict(warmup_steps=5, max_grad_norm=None),
                          **_ZCLIP),
    "adagc": Entry(optax_zclip.adagc, dict(warmup_steps=5), "adagc",
                   AdaGCRef, lambda model, leaves, g: model.step(leaves),
                   per_tensor=True, scheduled="lambda_rel"),
    "autoclip": Entry(optax_zclip.autoclip, dict(window=8), "autoclip",
                      AutoClipRef, _global(lambda r: r[0]),
                      scheduled="percentile", static_args=("window",)),
    "clip_by_global_norm": Entry(config=dict(max_norm=1.0),
                                 scheduled="max_norm", **_CLIP),
    "measure_only": Entry(config=dict(max_norm=None), clips=False, **_CLIP),
    # skip_spikes(chain(zclip, adamw)), as it is meant to be used.
    "skip_spikes": Entry(
        config=dict(warmup_steps=5), **_ZCLIP,
        wrapper=Wrapper(optax_zclip.skip_spikes, dict(window=8, sigma=3.0),
                        SkipSpikesRef)),
}

# The entries that scale the gradients themselves, for the suites about
# clipping; a wrapper's own rule (skipping whole steps) is its own suite's.
CLIPPERS = [name for name, e in TRANSFORMS.items() if e.wrapper is None]

# The entries that wrap ``chain(<transform>, adamw)``.
WRAPPERS = [name for name, e in TRANSFORMS.items() if e.wrapper is not None]

# The kind of each entry's clipping state.
KINDS = {name: e.kind for name, e in TRANSFORMS.items()}

# The public factory each entry exercises.
FACTORIES = {f.__name__ for e in TRANSFORMS.values()
             for f in [e.factory] + ([e.wrapper.factory] if e.wrapper else [])}


def with_adamw(name: str, learning_rate: float = 1e-2, **adamw_kwargs
               ) -> optax.GradientTransformation:
  """``optax.chain(<transform>, optax.adamw(learning_rate))``, wrapped."""
  e = TRANSFORMS[name]
  tx = optax.chain(e.make(), optax.adamw(learning_rate, **adamw_kwargs))
  return tx if e.wrapper is None else e.wrapper.factory(tx, **e.wrapper.config)


def no_loss(name: str) -> dict:
  """The extra arguments of an update that has no loss to pass: for a
  wrapper ``value=None``, which asks for its norm test alone (an update
  without ``value`` warns), for the others none."""
  return {"value": None} if name in WRAPPERS else {}


def wrapper_reference(name: str) -> SkipSpikesRef | None:
  """A float64 reference of the wrapper's decisions, or None."""
  w = TRANSFORMS[name].wrapper
  return None if w is None else w.model(**w.config)


def chain_state(name: str, opt_state):
  """The state of ``chain(<transform>, adamw)`` inside ``opt_state``."""
  return opt_state.inner_state if name in WRAPPERS else opt_state


def grad_norm(name: str, logged):
  """The global norm of the incoming gradients, from ``stats()``.

  A wrapper's own norm: the wrapped transform's is not updated on a skipped
  step.
  """
  return logged["skip/grad_norm" if name in WRAPPERS
                else f"{KINDS[name]}/grad_norm"]


def counted_steps(name: str, logged):
  """The transform's ``count`` from ``stats()``: the steps it saw."""
  return logged[f"{KINDS[name]}/count"]


# A small training run shared by the donation tests (one device and 8): a
# bf16 leaf among float32 ones, as mixed-precision models have, and at
# SPIKE, after every warm-up, a gradient 20x the others and a loss jump.
SHAPES = {"w": (16, 8), "b": (8,), "emb": (4, 16)}
DTYPES = {"w": jnp.float32, "b": jnp.float32, "emb": jnp.bfloat16}
SPIKE = 9


def params0():
  """The run's initial parameters."""
  return {k: jnp.full(s, 0.1, DTYPES[k]) for k, s in SHAPES.items()}


def grads_at(t):
  """The gradients of step ``t``."""
  rng = np.random.default_rng(t)
  scale = 20.0 if t == SPIKE else 1.0
  return {k: jnp.asarray(rng.standard_normal(s) * 0.05 * scale, DTYPES[k])
          for k, s in SHAPES.items()}


def loss_at(t):
  """The loss passed as ``value=`` at step ``t`` (`skip_spikes` reads it)."""
  return np.float32(2.0 - 0.01 * t + 0.02 * np.sin(t) + 3.0 * (t == SPIKE))
