"""Telemetry: find the clipping state in any optimizer state and report it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_zclip._adagc import AdaGCState
from optax_zclip._autoclip import AutoClipState
from optax_zclip._zclip import ZClipState


def _scalars(*fields: str) -> Callable[[Mapping], dict[str, jax.Array]]:
  return lambda state: {k: _unwrap(state[k]) for k in fields}


def _zclip_telemetry(state: Mapping) -> dict[str, jax.Array]:
  out = _scalars(*ZClipState._fields)(state)
  out["std"] = jnp.sqrt(out["var"])
  return out


# State class -> function from its fields (a mapping) to its telemetry: the
# scalar fields, ready to log, plus derived values. Per-tensor and buffer
# fields (AdaGC's gamma, AutoClip's history) are left out.
_TELEMETRY: dict[type[NamedTuple], Callable[[Mapping], dict[str, jax.Array]]] = {
    ZClipState: _zclip_telemetry,
    AdaGCState: _scalars("count", "grad_norm", "clipped_norm", "num_clipped",
                         "nonfinite_count"),
    AutoClipState: _scalars("count", "grad_norm", "clipped_norm", "threshold",
                            "nonfinite_count"),
}

_NAMES = {ZClipState: "zclip", AdaGCState: "adagc", AutoClipState: "autoclip"}


def _state_class(node: Any) -> type[NamedTuple] | None:
  for cls in _TELEMETRY:
    if isinstance(node, cls):
      return cls
    # `nnx.state(optimizer)` turns NamedTuples into mappings of their fields.
    if (isinstance(node, Mapping) and not isinstance(node, tuple)
        and set(node.keys()) == set(cls._fields)):
      return cls
  return None


def _unwrap(field: Any) -> jax.Array:
  # Inside `nnx.Optimizer` each field is a Variable: a pytree node around
  # exactly one array.
  leaves = jax.tree.leaves(field)
  if len(leaves) != 1:
    raise ValueError(f"expected one array in a state field, got {field!r}")
  return jnp.asarray(leaves[0])


def stats(opt_state: Any) -> dict[str, jax.Array]:
  """Telemetry of the clipping transform(s) inside an optimizer state.

  Searches any nesting of optimizer states, such as `optax.chain`,
  `optax.inject_hyperparams`, `optax.MultiSteps`, a Flax ``nnx.Optimizer``
  (pass the optimizer, its ``opt_state``, or ``nnx.state(optimizer)``), for
  the states of `zclip`, `adagc` and `autoclip`, and returns their scalar
  fields as float32 / int32 scalars, ready to log. Pure, so it can run inside
  `jax.jit` and return the values with the rest of a train step's metrics.

  The keys are, for a `ZClipState`, its fields (``count``, ``mean``,
  ``var``, ``grad_norm``, ``clipped_norm``, ``z_score``, ``threshold``,
  ``spike_count``, ``nonfinite_count``) plus ``std = sqrt(var)``; for an
  `AdaGCState` ``count``, ``grad_norm``, ``clipped_norm``, ``num_clipped``
  and ``nonfinite_count``; for an `AutoClipState` ``count``, ``grad_norm``,
  ``clipped_norm``, ``threshold`` and ``nonfinite_count``.

  If the state holds several clipping states, each key is prefixed with the
  transform's name and a slash (``"zclip/grad_norm"``, ``"adagc/..."``,
  ``"autoclip/..."``); when one kind occurs more than once (say, one ZClip
  per parameter group with `optax.partition`), the name is followed by the
  state's path in brackets, ``"zclip[inner_states.a.inner_state]/..."``.
  The keys are the same whether ``opt_state`` is an ``nnx.Optimizer`` or
  ``nnx.state`` of it.

  Args:
    opt_state: an optimizer state, or any pytree containing one.

  Returns:
    A dict from metric name to scalar array.

  Raises:
    ValueError: if no clipping state is found.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax, optax_zclip
    >>> tx = optax.chain(optax_zclip.zclip(), optax.adamw(1e-3))
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> sorted(optax_zclip.stats(state))  # doctest: +NORMALIZE_WHITESPACE
    ['clipped_norm', 'count', 'grad_norm', 'mean', 'nonfinite_count',
     'spike_count', 'std', 'threshold', 'var', 'z_score']

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025; Wang et al., `AdaGC
    <https://arxiv.org/abs/2502.11034>`_, 2025; Seetharaman et al.,
    `AutoClip <https://arxiv.org/abs/2007.14469>`_, 2020.
  """
  found = [
      (path, node) for path, node in jax.tree_util.tree_flatten_with_path(
          opt_state, is_leaf=lambda x: _state_class(x) is not None)[0]
      if _state_class(node) is not None
  ]
  if not found:
    names = ", ".join(cls.__name__ for cls in _TELEMETRY)
    raise ValueError(
        f"no clipping state ({names}) found in the optimizer state; pass the "
        "state returned by `tx.init`/`tx.update` or an `nnx.Optimizer`.")
  result: dict[str, jax.Array] = {}
  for path, node in found:
    cls = _state_class(node)
    fields = node if isinstance(node, Mapping) else node._asdict()
    prefix = ""
    if len(found) > 1:
      prefix = _NAMES[cls]
      if sum(_state_class(n) is cls for _, n in found) > 1:
        # `simple` renders attribute, dict and sequence keys alike, so the
        # name does not depend on how an nnx.Optimizer was passed in.
        prefix += "[" + jax.tree_util.keystr(path, simple=True,
                                             separator=".") + "]"
      prefix += "/"
    result.update(
        {prefix + k: v for k, v in _TELEMETRY[cls](fields).items()})
  return result
