"""Taking or skipping an update: the new state where kept, the old one else.

`skip_spikes` runs the update it wraps on every step and keeps its result
only where the step is taken. The obvious way, ``where(keep, new, old)`` on
the update's outputs (`select_after`), costs a copy of every optimizer
moment: AdamW's parameter step reads the new moments in its own fused loop,
while another loop overwrites the old moments in place with the selected
ones, so XLA must copy the old moments first. A `jax.lax.cond` instead
materialises the updates, which then cannot fuse into
`optax.apply_updates`. The Performance guide measures both.

`select_as_computed` costs neither. It traces the update once into a jaxpr
and evaluates that jaxpr in the current trace, one equation at a time,
replacing each new state value by ``where(keep, new, old)`` the moment it is
computed, so that everything computed from it, the updates included, reads
the selected value. XLA then sees the unwrapped update's dataflow (the step
reads the moments it has just written in place) with one select folded into
each loop: no copy and no extra pass. Every equation is evaluated with its
own source information (`_compat.source_of`), so the ops keep the
`jax.named_scope` names and source lines of the update in the lowered step
and in profiles.

Where ``keep`` holds, ``where`` returns ``new`` bit for bit, so a kept step
is exactly the update's; where it does not, the updates computed from the
old state are replaced by zeros (a ``where``, not a multiply by 0, so that a
NaN cannot leak through) and every state leaf is the old one.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_zclip import _compat, _shared_norms

# An update of (updates, state) to (updates, state), as `skip_spikes` gives
# it: the wrapped transformation's, with its other arguments bound.
Update = Callable[[Any, Any], tuple[Any, Any]]


class SelectUnsupported(Exception):
  """`select_as_computed` cannot evaluate this update on the installed JAX.

  The message names the cause: a construct of the update's jaxpr, or an API
  of JAX, that the evaluation does not know or that behaved unexpectedly.
  """


def _zeros_where_skipped(keep: jax.Array, leaves: Sequence[jax.Array]
                         ) -> list[jax.Array]:
  return [jnp.where(keep, u, jnp.zeros([], u.dtype)) for u in leaves]


def select_after(update: Update, keep: jax.Array, updates: Any,
                 state: Any) -> tuple[Any, Any]:
  """``update(updates, state)`` where ``keep``; else zero updates and
  ``state``, selected on the outputs.

  The same values as `select_as_computed`, bit for bit, at the cost of a
  copy of the optimizer state (see the module docstring). It never fails.
  """
  new_updates, new_state = update(updates, state)
  flat, tree = jax.tree.flatten(new_updates)
  return (jax.tree.unflatten(tree, _zeros_where_skipped(keep, flat)),
          jax.tree.map(lambda n, o: jnp.where(keep, n, o), new_state, state))


def select_as_computed(update: Update, keep: jax.Array, updates: Any,
                       state: Any) -> tuple[Any, Any]:
  """``update(updates, state)`` where ``keep``; else zero updates and
  ``state``, with each new state value selected as soon as it is computed
  (see the module docstring), which costs no copy.

  Raises:
    SelectUnsupported: if the update's jaxpr holds a construct, or JAX
      lacks an API, that the evaluation does not know, or binding an
      equation fails (the update itself traced without error, so the
      failure is the evaluation's); the message names the equation and the
      error. The caller may then trace `select_after` instead: what the
      evaluation bound before the failure is read by nothing, and XLA
      drops it.
  """
  flat_in, in_tree = jax.tree.flatten((updates, state))
  n_in = len(jax.tree.leaves(updates))
  old = flat_in[n_in:]

  def flat_update(*flat):
    # Norms offered for the updates (`skip_spikes` measured them) hold for
    # the arrays that stand for them in this trace too.
    with _shared_norms.carried(flat_in[:n_in], flat[:n_in]):
      return update(*jax.tree.unflatten(in_tree, flat))

  closed, out_shape = jax.make_jaxpr(flat_update, return_shape=True)(*flat_in)
  updates_tree = jax.tree.structure(out_shape[0])
  state_tree = jax.tree.structure(out_shape[1])
  n_updates = updates_tree.num_leaves
  try:
    _check_evaluable(closed)
    jaxpr = closed.jaxpr
    state_vars = jaxpr.outvars[n_updates:]
    # A state output that is a variable computed by exactly one equation
    # and no other output is selected where it is computed; the others
    # (a literal, an input passed through, a value two leaves share) at
    # the end.
    variables = [v for v in state_vars if not _compat.is_literal(v)]
    uses = collections.Counter(variables)
    inputs = set(jaxpr.invars)
    select = {v: o for v, o in zip(state_vars, old, strict=True)
              if not _compat.is_literal(v) and v not in inputs
              and uses[v] == 1}
    done = [not _compat.is_literal(v) and v in select for v in state_vars]
  except _compat.JaxprApiChanged as e:
    raise SelectUnsupported(str(e)) from e

  def substitute(var, value):
    return jnp.where(keep, value, select[var]) if var in select else value

  outs = _evaluate(closed, flat_in, substitute)
  new_state = [
      value if selected else jnp.where(keep, value, o)
      for selected, value, o in zip(done, outs[n_updates:], old, strict=True)]
  return (jax.tree.unflatten(updates_tree,
                             _zeros_where_skipped(keep, outs[:n_updates])),
          jax.tree.unflatten(state_tree, new_state))


def _check_evaluable(closed: Any) -> None:
  """Raises `SelectUnsupported` if the closed jaxpr ``closed`` lacks
  anything `_evaluate` reads, before any of it is bound (so that nothing is
  traced twice)."""
  jaxpr = getattr(closed, "jaxpr", None)
  if jaxpr is None or not hasattr(closed, "consts"):
    raise SelectUnsupported("make_jaxpr returned no ClosedJaxpr")
  for name in ("constvars", "invars", "outvars", "eqns"):
    if not hasattr(jaxpr, name):
      raise SelectUnsupported(f"a jaxpr has no `{name}`")
  for eqn in jaxpr.eqns:
    for name in ("primitive", "params", "invars", "outvars", "ctx",
                 "source_info"):
      if not hasattr(eqn, name):
        raise SelectUnsupported(f"a jaxpr equation has no `{name}`")
    if not hasattr(eqn.ctx, "manager"):
      raise SelectUnsupported("a jaxpr equation's context has no `manager`")
    prim = eqn.primitive
    for name in ("bind", "get_bind_params", "multiple_results"):
      if not hasattr(prim, name):
        raise SelectUnsupported(f"the primitive {prim} has no `{name}`")


def _evaluate(closed: Any, args: Sequence[Any],
              substitute: Callable[[Any, Any], Any]) -> list[Any]:
  """Evaluates ``closed`` on ``args`` in the current trace, one equation at a
  time, and returns the values of its outputs.

  ``substitute(var, value)`` is called on every value an equation computes
  and returns what its later readers (and the outputs) see instead. Each
  equation is bound in its own context (its sharding, say) and with its own
  source information (its named scopes and traceback).

  Up to jax 0.9 a result that nothing reads is a ``DropVar`` (a ``Var``
  subclass); 0.10 drops the class for plain ``Var``\\ s. Every result is
  stored, read or not, so neither kind needs naming.

  Raises:
    SelectUnsupported: see `select_as_computed`.
  """
  _check_evaluable(closed)
  jaxpr = closed.jaxpr
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, closed.consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))

  def read(atom):
    if _compat.is_literal(atom):
      return atom.val
    try:
      return env[atom]
    except KeyError:
      raise SelectUnsupported(
          f"an unknown jaxpr atom {atom!r} ({type(atom).__name__})") from None

  try:
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      try:
        subfuns, params = _compat.bind_params(eqn)
        with _compat.source_of(eqn), eqn.ctx.manager:
          out = eqn.primitive.bind(*subfuns, *invals, **params)
      except _compat.JaxprApiChanged:
        raise
      except Exception as e:  # noqa: BLE001 (any failure is the evaluation's)
        raise SelectUnsupported(
            f"binding {eqn.primitive} failed: {type(e).__name__}: {e}") from e
      results = out if eqn.primitive.multiple_results else [out]
      if len(results) != len(eqn.outvars):
        raise SelectUnsupported(
            f"{eqn.primitive} gave {len(results)} results for "
            f"{len(eqn.outvars)} variables")
      for var, value in zip(eqn.outvars, results, strict=True):
        env[var] = substitute(var, value)
    return [read(v) for v in jaxpr.outvars]
  except _compat.JaxprApiChanged as e:
    raise SelectUnsupported(str(e)) from e
