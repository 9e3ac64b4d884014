"""What this package needs from JAX that differs between its releases.

Everything version-dependent lives here, so that the rest of the package is
written once against the supported range (``pyproject.toml``'s floor to the
newest release). Each helper says which releases differ and how; none of
them compares version numbers, they test for the API itself.

* The jaxpr interpreter that `skip_spikes` replays its inner update with
  (`replay_jaxpr`): it reads jaxprs (``jax.extend.core``, equations, their
  parameters and contexts), an internal format that JAX changes between
  releases. It checks what it relies on and raises `ReplayUnsupported`,
  naming the cause, on anything it does not know, so that `skip_spikes`
  falls back to a plain (correct, costlier) select instead of failing.
* `optimization_barrier`, which not every release can trace under every
  transformation.
* The mesh helpers the multi-device tests and examples use: `shard_map`
  and `set_mesh`, which moved and were renamed between releases.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

try:  # jax.extend.core.Literal: in every release from 0.4.30 to 0.10.2.
  from jax.extend import core as _jex_core
  _Literal = _jex_core.Literal
except (ImportError, AttributeError):  # pragma: no cover (a moved API)
  _Literal = None


class ReplayUnsupported(Exception):
  """The jaxpr replay cannot evaluate an update on this version of JAX.

  The message names the cause: the construct or API that is missing or
  behaved unexpectedly.
  """


def _bind_params(eqn: Any) -> tuple[Sequence[Any], dict[str, Any]]:
  """``(subfuns, params)`` to bind ``eqn``'s primitive with.

  ``Primitive.get_bind_params`` returns the pair up to jax 0.9 and the
  parameters alone (a dict) from 0.10 on.
  """
  got = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(got, dict):
    return (), got
  if isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict):
    return got
  raise ReplayUnsupported(
      f"get_bind_params of {eqn.primitive} returned a {type(got).__name__}")


def _check_replayable(closed: Any) -> None:
  """Raises `ReplayUnsupported` if the closed jaxpr ``closed`` uses anything
  the replay does not know, before any of it is bound (so that nothing is
  traced twice)."""
  jaxpr = getattr(closed, "jaxpr", None)
  if jaxpr is None or not hasattr(closed, "consts"):
    raise ReplayUnsupported("make_jaxpr returned no ClosedJaxpr")
  for name in ("constvars", "invars", "outvars", "eqns"):
    if not hasattr(jaxpr, name):
      raise ReplayUnsupported(f"a jaxpr has no `{name}`")
  for eqn in jaxpr.eqns:
    for name in ("primitive", "params", "invars", "outvars", "ctx"):
      if not hasattr(eqn, name):
        raise ReplayUnsupported(f"a jaxpr equation has no `{name}`")
    if not hasattr(eqn.ctx, "manager"):
      raise ReplayUnsupported("a jaxpr equation's context has no `manager`")
    prim = eqn.primitive
    for name in ("bind", "get_bind_params", "multiple_results"):
      if not hasattr(prim, name):
        raise ReplayUnsupported(f"the primitive {prim} has no `{name}`")


def is_literal(atom: Any) -> bool:
  """Whether a jaxpr atom is a constant written into the jaxpr (a literal),
  rather than a variable.

  Raises:
    ReplayUnsupported: if this JAX has no ``jax.extend.core.Literal``.
  """
  if _Literal is None:
    raise ReplayUnsupported("jax.extend.core.Literal is missing")
  return isinstance(atom, _Literal)


def replay_jaxpr(closed: Any, args: Sequence[Any],
                 substitute: Callable[[Any, Any], Any]) -> list[Any]:
  """Evaluates ``closed`` on ``args`` in the current trace, one equation at a
  time, and returns the values of its outputs.

  ``substitute(var, value)`` is called on every value an equation computes
  and returns what its later readers (and the outputs) see instead.

  Up to jax 0.9 a result that nothing reads is a ``DropVar`` (a ``Var``
  subclass); 0.10 drops the class for plain ``Var``\\ s. Every result is
  stored, read or not, so neither kind needs naming.

  Raises:
    ReplayUnsupported: if the jaxpr holds something this interpreter does
      not know, or binding an equation fails (the update itself traced
      without error when it was turned into ``closed``, so the failure is
      the replay's); the message names the equation and the error.
  """
  _check_replayable(closed)
  jaxpr = closed.jaxpr
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, closed.consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))

  def read(atom):
    if is_literal(atom):
      return atom.val
    try:
      return env[atom]
    except KeyError:
      raise ReplayUnsupported(
          f"an unknown jaxpr atom {atom!r} ({type(atom).__name__})") from None

  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    try:
      subfuns, params = _bind_params(eqn)
      with eqn.ctx.manager:  # the equation's context (e.g. its sharding)
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    except ReplayUnsupported:
      raise
    except Exception as e:  # noqa: BLE001 (any failure is the replay's)
      raise ReplayUnsupported(
          f"binding {eqn.primitive} failed: {type(e).__name__}: {e}") from e
    results = out if eqn.primitive.multiple_results else [out]
    if len(results) != len(eqn.outvars):
      raise ReplayUnsupported(
          f"{eqn.primitive} gave {len(results)} results for "
          f"{len(eqn.outvars)} variables")
    for v, x in zip(eqn.outvars, results, strict=True):
      env[v] = substitute(v, x)
  return [read(v) for v in jaxpr.outvars]


# --- Meshes: for the multi-device tests and the examples. ---

def optimization_barrier(x: Any) -> Any:
  """``jax.lax.optimization_barrier(x)``, or ``x`` itself where the
  transformation being traced has no rule for the barrier.

  jax 0.4.36 has no batching rule for it (``jax.vmap`` raises
  ``NotImplementedError`` when the barrier is traced); jax 0.10.2 has one.
  The barrier changes no value, only what XLA may fuse, so leaving it out
  there changes no result: under ``jax.vmap`` on such a release, XLA may
  again merge the norms' square with the update's.
  """
  try:
    return jax.lax.optimization_barrier(x)
  except NotImplementedError:
    return x


def shard_map(f: Callable, *, mesh: Any, in_specs: Any, out_specs: Any,
              check_vma: bool = True) -> Callable:
  """`jax.shard_map` (jax >= 0.6), else ``jax.experimental.shard_map``'s,
  whose ``check_rep`` became ``check_vma``."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=check_vma)
  from jax.experimental.shard_map import shard_map as old  # noqa: PLC0415
  kwargs = ({"check_vma": check_vma}
            if "check_vma" in inspect.signature(old).parameters
            else {"check_rep": check_vma})
  return old(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kwargs)


@contextlib.contextmanager
def set_mesh(mesh: Any) -> Iterator[None]:
  """``with jax.set_mesh(mesh)`` where JAX has it (0.7.2 does, 0.7.0 does
  not); before it ``jax.sharding.use_mesh`` (0.5 to 0.7.0), and before
  that the mesh's own context manager (0.4.36)."""
  if hasattr(jax, "set_mesh"):
    cm = jax.set_mesh(mesh)
  elif hasattr(jax.sharding, "use_mesh"):
    cm = jax.sharding.use_mesh(mesh)
  else:
    cm = mesh
  with cm:
    yield


def mesh_axis_types() -> dict[str, Any]:
  """The mesh axis types this JAX has, by name: ``auto`` and, where there
  is one, ``explicit`` (explicit sharding). Releases without
  ``jax.sharding.AxisType`` have one kind of axis, what later ones call
  ``Auto``; it is given as None, the default of `mesh`."""
  kinds = getattr(jax.sharding, "AxisType", None)
  if kinds is None:
    return {"auto": None}
  return {name.lower(): getattr(kinds, name) for name in ("Auto", "Explicit")
          if hasattr(kinds, name)}


def mesh(devices: Any, names: tuple[str, ...], axis_type: Any = None) -> Any:
  """``jax.sharding.Mesh(devices, names)``, its axes all of ``axis_type``
  (one of `mesh_axis_types`; None: the default)."""
  if axis_type is None:
    return jax.sharding.Mesh(devices, names)
  return jax.sharding.Mesh(devices, names,
                           axis_types=(axis_type,) * len(names))
