"""Upgrades an optimizer state restored from an older release's checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from optax_zclip._stats import _declared_class

_Path = tuple[str, ...]


def _key(entry: Any) -> str:
  # A checkpoint keeps no node types: Orbax restores a NamedTuple as a dict
  # of its field names and a tuple as a list, with string keys. Paths are
  # compared by their names alone.
  for attr in ("name", "key", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _path(path: tuple) -> _Path:
  return tuple(_key(e) for e in path)


def _show(path: _Path) -> str:
  return "/".join(path) or "(the root)"


def _children(node: Any) -> list[tuple[str, Any]]:
  """A node's children with their keys, one level down. Mappings are walked
  by their items, since `nnx.state`'s mappings flatten to their leaves in
  one go and would hide the states inside them."""
  if isinstance(node, Mapping):
    return [(str(k), v) for k, v in node.items()]
  if isinstance(node, (list, tuple)):
    fields = getattr(node, "_fields", None)
    return list(zip(fields or map(str, range(len(node))), node, strict=True))
  flat = jax.tree_util.tree_flatten_with_path(
      node, is_leaf=lambda n: n is not node)[0]
  return [(_key(p[0]), v) for p, v in flat if p]


def _fillable(node: Any, base: _Path = ()
              ) -> dict[_Path, tuple[str, _Path]]:
  """The paths of the leaves of this package's states in ``node`` (as
  NamedTuples, or as the mappings ``nnx.state`` makes of them): path ->
  (the state's class name, the path of the state itself)."""
  cls = _declared_class(node)
  if cls is not None:
    found = {}
    for field in cls._fields:
      value = node[field] if isinstance(node, Mapping) else getattr(node,
                                                                    field)
      for p, _ in jax.tree_util.tree_flatten_with_path(value)[0]:
        found[(*base, field, *_path(p))] = (cls.__name__, base)
    return found
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(node)):
    return {}
  found = {}
  for key, child in _children(node):
    found.update(_fillable(child, (*base, key)))
  return found


def migrate_state(restored: Any, template: Any) -> Any:
  """An optimizer state restored from an older checkpoint, in today's layout.

  A release may add fields to a state of this package (0.2.0 added
  ``capped`` and ``cap_count`` to `ZClipState` and `AdaGCState`). Restore
  such a checkpoint without a target (the tree as saved) and pass it here
  with a fresh state of the same optimizer: every value the checkpoint holds
  is kept, bit for bit, and a field it lacks takes ``template``'s value::

    restored = ckptr.restore(path)                 # no target: as saved
    opt_state = optax_zclip.migrate_state(restored["opt_state"],
                                          tx.init(params))

  Only fields of this package's states may be missing; any other difference
  means a checkpoint of another optimizer, and is an error
  (:ref:`older-checkpoint`).

  Args:
    restored: the optimizer state as restored from the checkpoint: as
      Orbax restores it without a target (dicts and lists), or in any
      pytree whose paths name the same fields (NamedTuples, tuples).
    template: a state of the optimizer as built today, with concrete
      arrays: ``tx.init(params)``. Its structure, node types and arrays'
      shardings are those of the result.

  Returns:
    A pytree with the structure of ``template``, holding the restored
    values (placed like ``template``'s arrays) and, for the fields the
    checkpoint lacks, ``template``'s.

  Raises:
    ValueError: if ``restored`` lacks a value that is not a field of a
      state of this package, or lacks a whole state, or holds a value
      ``template`` has no place for, or a value of another shape or dtype
      than ``template``'s; the message names the path.

  Example:
    >>> import jax.numpy as jnp, optax, optax_zclip
    >>> tx = optax.chain(optax_zclip.zclip(), optax.sgd(0.1))
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> # As Orbax restores a checkpoint written before `cap_count` existed:
    >>> old = [{k: v for k, v in state[0]._asdict().items()
    ...         if k not in ("capped", "cap_count")}, [{}, {}]]
    >>> new = optax_zclip.migrate_state(old, state)
    >>> type(new[0]).__name__, int(new[0].cap_count)
    ('ZClipState', 0)

  References:
    Orbax's restore without a target, which gives the tree as saved:
    `Orbax checkpointing <https://orbax.readthedocs.io/>`_.
  """
  given = {_path(p): v for p, v in
           jax.tree_util.tree_flatten_with_path(restored)[0]}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  fillable = _fillable(template)
  present_states = {base for path, (_, base) in fillable.items()
                    if path in given}
  out, missing = [], []
  for p, want in leaves:
    path = _path(p)
    if path not in given:
      cls, base = fillable.get(path, (None, None))
      if cls is None or base not in present_states:
        missing.append(path)
      out.append(want)
      continue
    value = given.pop(path)
    if np.shape(value) != np.shape(want):
      raise ValueError(f"migrate_state: {_show(path)} has shape "
                       f"{np.shape(value)} in the checkpoint and "
                       f"{np.shape(want)} in `template`: a checkpoint of "
                       "another optimizer, or other params")
    dtype = getattr(want, "dtype", None)
    if dtype is not None and np.dtype(getattr(value, "dtype", dtype)) != dtype:
      raise ValueError(f"migrate_state: {_show(path)} is "
                       f"{np.dtype(value.dtype)} in the checkpoint and "
                       f"{np.dtype(dtype)} in `template`")
    if isinstance(want, jax.Array):
      value = jax.device_put(value, want.sharding)
    out.append(value)
  if missing:
    shown = ", ".join(_show(p) for p in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise ValueError(f"migrate_state: the checkpoint has no {shown}{more}: "
                     "`template` must be a state of the optimizer that "
                     "wrote the checkpoint (the same chain, the same "
                     "params); only fields a release of optax_zclip added "
                     "to its states may be missing")
  if given:
    shown = ", ".join(_show(p) for p in list(given)[:3])
    more = f" and {len(given) - 3} more" if len(given) > 3 else ""
    raise ValueError(f"migrate_state: the checkpoint holds {shown}{more}, "
                     "for which `template` has no place: `template` must be "
                     "a state of the optimizer that wrote the checkpoint")
  return jax.tree_util.tree_unflatten(treedef, out)
