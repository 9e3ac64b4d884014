"""Every public transform of the package, built as a training loop uses it.

`TRANSFORMS` maps a name to a builder with small warm-ups, so that a short
run passes through warm-up and into the adaptive rule. Tests that must hold
for every transform (donation, one compile per step, Orbax) parametrize over
it; `test_donation.py` checks that it lists every public factory, so a new
transform cannot be left out. A transform that wraps the whole optimizer
(`skip_spikes`) is listed with the transform it wraps the chain of, and in
`WRAPPERS` with how it wraps it; the helpers below find the chain's state
and the telemetry in either case.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from references import SkipSpikesRef

import optax_zclip

TRANSFORMS = {
    "zclip": lambda: optax_zclip.zclip(warmup_steps=5),
    "zclip_no_cap": lambda: optax_zclip.zclip(warmup_steps=5,
                                              max_grad_norm=None),
    "adagc": lambda: optax_zclip.adagc(warmup_steps=5),
    "autoclip": lambda: optax_zclip.autoclip(window=8),
    "clip_by_global_norm": lambda: optax_zclip.clip_by_global_norm(1.0),
    "measure_only": lambda: optax_zclip.clip_by_global_norm(None),
    # skip_spikes(chain(zclip, adamw)), as it is meant to be used.
    "skip_spikes": lambda: optax_zclip.zclip(warmup_steps=5),
}

# The entries that wrap ``chain(<transform>, adamw)``: name -> (wrapper,
# its float64 reference).
WRAPPERS = {
    "skip_spikes": (
        lambda opt: optax_zclip.skip_spikes(opt, window=8, sigma=3.0),
        lambda: SkipSpikesRef(window=8, sigma=3.0)),
}

# The public factory each entry exercises.
FACTORIES = {"zclip", "adagc", "autoclip", "clip_by_global_norm",
             "skip_spikes"}


def with_adamw(name: str, learning_rate: float = 1e-2
               ) -> optax.GradientTransformation:
  """``optax.chain(<transform>, optax.adamw(learning_rate))``, wrapped."""
  tx = optax.chain(TRANSFORMS[name](), optax.adamw(learning_rate))
  return WRAPPERS[name][0](tx) if name in WRAPPERS else tx


def reference(name: str) -> SkipSpikesRef | None:
  """A float64 reference of the wrapper's decisions, or None."""
  return WRAPPERS[name][1]() if name in WRAPPERS else None


def chain_state(name: str, opt_state):
  """The state of ``chain(<transform>, adamw)`` inside ``opt_state``."""
  return opt_state.inner_state if name in WRAPPERS else opt_state


# The kind of each entry's clipping state: its keys in ``stats()`` are
# ``<kind>/<field>``, wrapped or not.
KINDS = {"zclip": "zclip", "zclip_no_cap": "zclip", "adagc": "adagc",
         "autoclip": "autoclip", "clip_by_global_norm": "clip",
         "measure_only": "clip", "skip_spikes": "zclip"}


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
