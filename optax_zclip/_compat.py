"""What this package needs from JAX that differs between its releases.

Everything version-dependent lives here, so that the rest of the package is
written once against the supported range (``pyproject.toml``'s floor to the
newest release). Each helper says which releases differ and how; none of
them compares version numbers, they test for the API itself.

* What `_select` reads of a jaxpr: literals, an equation's bind parameters
  and its source information. Jaxprs are an internal format of JAX; where
  one of these is missing or changed shape, the helper raises
  `JaxprApiChanged`, naming it, and `skip_spikes` selects after the fact
  instead of failing.
* `optimization_barrier`, which not every release can trace under every
  transformation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax

try:  # jax.extend.core.Literal: in every release from 0.4.36 to 0.12.
  from jax.extend import core as _jex_core
  _Literal = _jex_core.Literal
except (ImportError, AttributeError):  # pragma: no cover (a moved API)
  _Literal = None

try:  # jax.extend.source_info_util: in every release from 0.4.36 to 0.12.
  from jax.extend import source_info_util as _source_info
except ImportError:  # pragma: no cover (a moved API)
  _source_info = None


class JaxprApiChanged(Exception):
  """A part of JAX's jaxpr API that `_select` reads is missing or changed.

  The message names it.
  """


def is_literal(atom: Any) -> bool:
  """Whether a jaxpr atom is a constant written into the jaxpr (a literal),
  rather than a variable.

  Raises:
    JaxprApiChanged: if this JAX has no ``jax.extend.core.Literal``.
  """
  if _Literal is None:
    raise JaxprApiChanged("jax.extend.core.Literal is missing")
  return isinstance(atom, _Literal)


def bind_params(eqn: Any) -> tuple[Sequence[Any], dict[str, Any]]:
  """``(subfuns, params)`` to bind ``eqn``'s primitive with.

  ``Primitive.get_bind_params`` returns the pair up to jax 0.9 and the
  parameters alone (a dict) from 0.10 on.

  Raises:
    JaxprApiChanged: if it returns anything else.
  """
  got = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(got, dict):
    return (), got
  if isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict):
    return got
  raise JaxprApiChanged(
      f"get_bind_params of {eqn.primitive} returned a {type(got).__name__}")


@contextlib.contextmanager
def source_of(eqn: Any) -> Iterator[None]:
  """Within the block, operations are traced with ``eqn``'s source
  information: its name stack (the `jax.named_scope`\\ s it was traced in)
  appended to the current one, and its Python traceback, as JAX's own
  ``eval_jaxpr`` gives them. So the names and source lines of the ops a
  replayed jaxpr emits are those of the function it was traced from, in
  the lowered module and in profiles.

  ``jax.extend.source_info_util`` has ``user_context`` and
  ``current_name_stack`` from 0.4.36 to 0.12 (the first argument of
  ``user_context`` is named ``c`` in some releases, ``traceback`` in
  others: it is passed by position).

  Raises:
    JaxprApiChanged: if that module, those functions or the equation's
      ``source_info`` are missing.
  """
  info = getattr(eqn, "source_info", None)
  for obj, name in ((_source_info, "user_context"),
                    (_source_info, "current_name_stack"),
                    (info, "name_stack"), (info, "traceback")):
    if not hasattr(obj, name):
      raise JaxprApiChanged(
          f"no `{name}` for the source information of a jaxpr equation")
  names = _source_info.current_name_stack() + info.name_stack
  with _source_info.user_context(info.traceback, name_stack=names):
    yield


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
