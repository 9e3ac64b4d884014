"""Telemetry: find the clipping states in any optimizer state and report them.

Each state class declares its own telemetry with `_registry.loggable_state`;
`stats` only walks the optimizer state and asks the registry about every
state it finds. A new transform therefore never edits this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from optax_zclip._registry import DECLARED


def _is_nnx_state(node: Any) -> bool:
  # `nnx.state(optimizer)` turns each NamedTuple into a flax `State` mapping
  # of its field names. Only such mappings are matched by their keys: a
  # user's plain dict with the same key names is not a clipping state.
  return (isinstance(node, Mapping) and not isinstance(node, (dict, tuple))
          and type(node).__module__.split(".")[0] == "flax")


def _declared_class(node: Any) -> type | None:
  for cls in DECLARED:
    if isinstance(node, cls):
      return cls
  if _is_nnx_state(node):
    keys = set(node.keys())
    for cls in DECLARED:
      if keys == set(cls._fields):
        return cls
  return None


def _unwrap(field: Any) -> jax.Array:
  # Inside `nnx.Optimizer` each field is a Variable: a pytree node around
  # exactly one array.
  leaves = jax.tree.leaves(field)
  if len(leaves) != 1:
    raise ValueError(f"expected one array in a state field, got {field!r}")
  return jnp.asarray(leaves[0])


def _report(cls: type, node: Any) -> dict[str, jax.Array]:
  decl = DECLARED[cls]
  out = {k: _unwrap(node[k] if isinstance(node, Mapping)
                    else getattr(node, k)) for k in decl.fields}
  for key, fn in decl.derived:
    out[key] = fn(out)
  return out


def _find(node: Any, path: tuple) -> Any:
  """Yields ``(path, state, class)`` for every declared state in ``node``."""
  cls = _declared_class(node)
  if cls is not None:
    yield path, node, cls
  # A declared state may hold other states (`skip_spikes` keeps the state of
  # the optimizer it wraps): its fields are searched too.
  if _is_nnx_state(node):
    # Walked by its items: flattening it would hand out its plain-dict
    # insides, which no longer say they came from `nnx.state`.
    for key, child in node.items():
      yield from _find(child, (*path, jax.tree_util.DictKey(key)))
  else:
    children = jax.tree_util.tree_flatten_with_path(
        node, is_leaf=lambda x: x is not node)[0]
    is_leaf = (len(children) == 1 and children[0][0] == ()
               and children[0][1] is node)
    if not is_leaf:
      for key, child in children:
        yield from _find(child, (*path, *key))


def _path_name(path: tuple[Any, ...]) -> str:
  """``a.0.b`` for a path of attribute, dict and sequence keys alike, so that
  a name does not depend on how an nnx.Optimizer was passed in (what
  ``jax.tree_util.keystr(path, simple=True, separator=".")`` gives on the
  JAX releases that have those arguments)."""
  parts = []
  for key in path:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey, SequenceKey
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts)


def _flax_kind(node: Any) -> str | None:
  """``"Optimizer"``, ``"OptState"`` or ``"Module"`` for Flax NNX objects and
  variables of those kinds (without importing Flax), else None."""
  for cls in type(node).__mro__:
    if (cls.__module__.split(".")[0] == "flax"
        and cls.__name__ in ("Optimizer", "OptState", "Module")):
      return cls.__name__
  return None


def _is_optimizer_state(node: Any) -> bool:
  # Every optax transform's state is a NamedTuple (`optax.EmptyState` for a
  # stateless one); `nnx.state(optimizer)` keeps its arrays in `OptState`
  # variables.
  return ((isinstance(node, tuple) and hasattr(type(node), "_fields"))
          or _flax_kind(node) in ("Optimizer", "OptState"))


def _check_holds_optimizer_state(tree: Any) -> None:
  """Raises `TypeError` for a tree with leaves but no optimizer state in
  it: a model or its parameters, None or a number, passed to `stats` by
  mistake."""
  # None counts as a leaf here (jax drops it), so that `stats(None)`, the
  # value of an optimizer state not yet set, is refused like a number.
  nodes = jax.tree.leaves(
      tree, is_leaf=lambda x: x is None or _is_optimizer_state(x))
  if not nodes or any(_is_optimizer_state(n) for n in nodes):
    return  # An empty state (`optax.chain()`'s), or a real one.
  if _flax_kind(tree) == "Module":
    what = "a model (an nnx.Module)"
  elif tree is None:
    what = "None"
  elif len(nodes) == 1 and nodes[0] is tree:
    kind = type(tree).__name__
    what = ("an " if kind[:1] in "aeiou" else "a ") + kind
  else:
    what = (f"a {type(tree).__name__} with {len(nodes)} "
            f"{'leaf' if len(nodes) == 1 else 'leaves'}")
  raise TypeError(
      f"stats() got {what}, which holds no optimizer state: no optax state "
      "(a NamedTuple such as ScaleByAdamState) and no nnx.Optimizer. Pass "
      "the optimizer state: what tx.init and tx.update return, a "
      "TrainState's opt_state, an nnx.Optimizer or nnx.state(optimizer). A "
      "model or its parameters is a likely slip.")


def stats(opt_state: Any, default: Any = None) -> dict[str, jax.Array]:
  """Telemetry of the clipping transform(s) inside an optimizer state.

  Finds the states of this package's transforms (and of any state declared
  with `loggable_state`) in any nesting of optimizer states (`optax.chain`,
  `optax.inject_hyperparams`, `optax.MultiSteps`, a Flax ``nnx.Optimizer``
  or ``nnx.state`` of it, ...) and returns their scalar fields, ready to
  log. Pure, so it can run inside `jax.jit`. Every key is
  ``<kind>/<field>``:

  * ``zclip/`` (`zclip`): ``count``, ``mean``, ``var``, ``grad_norm``,
    ``clipped_norm``, ``z_score``, ``threshold``, ``spike_count``,
    ``nonfinite_count``, ``restart_count``, ``capped``, ``cap_count`` and
    ``std = sqrt(var)``;
  * ``adagc/`` (`adagc`): ``count``, ``grad_norm``, ``clipped_norm``,
    ``num_clipped``, ``nonfinite_count``, ``capped``, ``cap_count``;
  * ``autoclip/`` (`autoclip`): ``count``, ``grad_norm``, ``clipped_norm``,
    ``threshold``, ``nonfinite_count``;
  * ``clip/`` (`clip_by_global_norm`): ``count``, ``grad_norm``,
    ``clipped_norm``, ``threshold``, ``clipped_count``, ``nonfinite_count``;
  * ``skip/`` (`skip_spikes`): ``size``, ``skipped``, ``skip_count``,
    ``nonfinite_count``, ``grad_norm``, ``loss_threshold``,
    ``norm_threshold``; the states inside the optimizer it wraps report
    their own keys.

  A kind that occurs more than once (one ZClip per parameter group) is
  followed by the state's path in brackets,
  ``"zclip[inner_states.embed.inner_state.0]/grad_norm"``. The meaning of
  each key is in :ref:`telemetry-names`; where `stats` looks, in
  :ref:`telemetry-where`.

  Args:
    opt_state: an optimizer state, or any pytree containing one.
    default: what to return when no clipping state is found; None (the
      default) means an empty dict, so that one train step can log
      ``stats(state)`` whatever the optimizer.

  Returns:
    A dict from metric name to scalar array.

  Raises:
    TypeError: if ``opt_state`` holds leaves but no optimizer state at all
      (a model, a params tree, None or a number passed by mistake). An
      optimizer state without a clipping transform returns ``default``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax, optax_zclip
    >>> tx = optax.chain(optax_zclip.zclip(), optax.adamw(1e-3))
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> sorted(optax_zclip.stats(state))  # doctest: +NORMALIZE_WHITESPACE
    ['zclip/cap_count', 'zclip/capped', 'zclip/clipped_norm', 'zclip/count',
     'zclip/grad_norm', 'zclip/mean', 'zclip/nonfinite_count',
     'zclip/restart_count', 'zclip/spike_count', 'zclip/std',
     'zclip/threshold', 'zclip/var', 'zclip/z_score']
    >>> optax_zclip.stats(optax.adamw(1e-3).init({"w": jnp.zeros(3)}))
    {}

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025; Wang et al., `AdaGC
    <https://arxiv.org/abs/2502.11034>`_, 2025; Seetharaman et al.,
    `AutoClip <https://arxiv.org/abs/2007.14469>`_, 2020.
  """
  found = list(_find(opt_state, ()))
  if not found:
    _check_holds_optimizer_state(opt_state)
    return {} if default is None else default
  result: dict[str, jax.Array] = {}
  for path, node, cls in found:
    # Always prefixed, so that a key does not change when another clipping
    # state joins the optimizer (wrapping the chain in `skip_spikes`, say).
    prefix = DECLARED[cls].name
    if sum(c is cls for _, _, c in found) > 1:
      prefix += "[" + _path_name(path) + "]"
    prefix += "/"
    result.update({prefix + k: v for k, v in _report(cls, node).items()})
  return result
