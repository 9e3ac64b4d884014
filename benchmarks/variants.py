"""The optimizer chains the benchmarks compare, under one naming."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import optax

import optax_zclip

# Arguments for a clipping factory that has required ones: the fixed
# threshold, at optax's customary 1.0.
_ARGS = {"clip_by_global_norm": (1.0,)}


def _is_clipper(name: str) -> bool:
  """Whether ``optax_zclip.<name>`` builds a clipping transform: a public
  function that returns a plain `optax.GradientTransformation`
  (`skip_spikes`, which wraps a whole optimizer, returns the ExtraArgs
  kind)."""
  factory = getattr(optax_zclip, name)
  return inspect.isfunction(factory) and str(
      inspect.signature(factory).return_annotation).endswith(
          "GradientTransformation")


# This package's clipping transforms, by factory name: every one of them,
# so that a new one is benchmarked without being listed here.
CLIPPERS = tuple(n for n in optax_zclip.__all__ if _is_clipper(n))


class Variant(NamedTuple):
  """An optimizer to benchmark: its factory, and whether its update takes
  the loss as ``value=`` (`optax_zclip.skip_spikes` does)."""

  make: Callable[[], optax.GradientTransformation]
  takes_value: bool


def table(learning_rate: float) -> dict[str, Variant]:
  """Every chain, by name: ``adamw``; optax's clipping as
  ``optax.<name>+adamw``; each of this package's clipping transforms as
  ``<name>+adamw``; and, after AdamW and each of this package's chains,
  `skip_spikes` around it as ``skip_spikes(<chain>)``. AdamW's learning rate
  is ``learning_rate``."""

  def adamw():
    return optax.adamw(learning_rate)

  def clipped(name):
    return lambda: optax.chain(
        getattr(optax_zclip, name)(*_ARGS.get(name, ())), adamw())

  def skipping(make):
    return lambda: optax_zclip.skip_spikes(make())

  chains = {"adamw": adamw,
            "optax.clip_by_global_norm+adamw": lambda: optax.chain(
                optax.clip_by_global_norm(1.0), adamw())}
  chains |= {f"{n}+adamw": clipped(n) for n in CLIPPERS}
  out = {}
  for name, make in chains.items():
    out[name] = Variant(make, False)
    if not name.startswith("optax."):
      out[f"skip_spikes({name})"] = Variant(skipping(make), True)
  return out
