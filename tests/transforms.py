"""Every public transform of the package, built as a training loop uses it.

`TRANSFORMS` maps a name to a builder with small warm-ups, so that a short
run passes through warm-up and into the adaptive rule. Tests that must hold
for every transform (donation, one compile per step, Orbax) parametrize over
it; `test_donation.py` checks that it lists every public factory, so a new
transform cannot be left out.
"""

from __future__ import annotations

import optax

import optax_zclip

TRANSFORMS = {
    "zclip": lambda: optax_zclip.zclip(warmup_steps=5),
    "zclip_no_cap": lambda: optax_zclip.zclip(warmup_steps=5,
                                              max_grad_norm=None),
    "adagc": lambda: optax_zclip.adagc(warmup_steps=5),
    "autoclip": lambda: optax_zclip.autoclip(window=8),
    "clip_by_global_norm": lambda: optax_zclip.clip_by_global_norm(1.0),
    "measure_only": lambda: optax_zclip.clip_by_global_norm(None),
}

# The public factory each entry exercises.
FACTORIES = {"zclip", "adagc", "autoclip", "clip_by_global_norm"}


def with_adamw(name: str, learning_rate: float = 1e-2
               ) -> optax.GradientTransformation:
  """``optax.chain(<transform>, optax.adamw(learning_rate))``."""
  return optax.chain(TRANSFORMS[name](), optax.adamw(learning_rate))
