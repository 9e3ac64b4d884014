"""Validation of hyperparameters when a transform is built, and of states.

Concrete values (Python and NumPy numbers, 0-d NumPy arrays, and jax arrays
that are not tracers) are checked in full; a value that is neither a real
number nor a scalar array (a string, None, a bool, a vector) is rejected.
Inside `jax.jit` (for instance under `optax.inject_hyperparams` in a jitted
update) the factory receives tracers, whose values cannot be read: only
their rank and dtype are checked, so no host sync ever happens in a jitted
step.

No jitted computation happens here, so the host-side spike metrics use it too.
`check_state` refuses, when an update is traced, a state that is not the
transform's own.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

# The step counters are int32 and saturate there (`optax.safe_increment`).
INT32_MAX = int(np.iinfo(np.int32).max)


_F = TypeVar("_F", bound=Callable[..., Any])


def keyword_only(factory: _F) -> _F:
  """Makes ``factory``'s TypeError for a number given by position say why.

  ``factory`` declares its floats keyword-only (``zclip(*, alpha, ...)``):
  several floats in a row would let a misplaced one (a learning rate
  given to ``zclip``) pass every range check. Python's own message does not
  say what to write instead; this one does. The signature, which
  `inspect.signature` and the docs read, is ``factory``'s.
  """
  sig = inspect.signature(factory)
  positional = [p.name for p in sig.parameters.values()
                if p.kind is p.POSITIONAL_OR_KEYWORD]
  first = next(p.name for p in sig.parameters.values()
               if p.kind is p.KEYWORD_ONLY)
  name = factory.__name__

  @functools.wraps(factory)
  def wrapper(*args, **kwargs):
    if len(args) > len(positional):
      extra = args[len(positional):]
      lead = "".join(f"{p}, " for p in positional)
      raise TypeError(
          f"{name}() takes its hyperparameters by name only, so that a "
          f"number cannot land on the wrong one; got {extra[0]!r} by "
          f"position. Write {name}({lead}{first}={extra[0]!r}) if that is "
          "what it is" + ("." if positional else
                          f"; a learning rate goes to the optimizer after "
                          f"{name} in the chain."))
    return factory(*args, **kwargs)

  return wrapper  # type: ignore[return-value]


def _tracer(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _on_host(value: Any) -> Any:
  """A concrete (non-tracer) jax array as a NumPy array; else ``value``.

  Reading it is a device-to-host copy when the transform is built, outside
  any jitted step.
  """
  if isinstance(value, jax.Array) and not _tracer(value):
    return np.asarray(value)
  return value


def _concrete(value: Any) -> float | None:
  """A real number or 0-d NumPy array as a float, else None (bools too)."""
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, (numbers.Real, np.integer, np.floating)):
    return float(value)
  if (isinstance(value, np.ndarray) and value.ndim == 0
      and value.dtype.kind in "iuf"):
    return float(value)
  return None


def _traced_scalar(value: Any) -> bool:
  """Whether ``value`` is a real scalar tracer.

  Its value cannot be read, but its rank and dtype are static and are
  checked.
  """
  return (_tracer(value) and value.ndim == 0
          and jnp.dtype(value.dtype).kind in "iuf")


def check_number(name: str, value: Any, ok: Callable[[float], bool],
                 allowed: str, *, float32: bool = False,
                 inf_ok: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` is a real number that passes ``ok``.

  A scalar tracer (what `optax.inject_hyperparams` passes inside `jax.jit`)
  is accepted without reading its value; a concrete jax array is read.
  Anything else that is not a real number (a string, None, a bool, an
  array of rank > 0) is rejected, and so are NaN and, unless ``inf_ok``,
  +-inf.

  Args:
    name: the argument's name, for the message.
    value: the value to check.
    ok: the range check, on the value as a float.
    allowed: what is allowed, for the message ("must be {allowed}").
    float32: check the value rounded to float32, the precision the
      transform computes in (so that, say, 0.9999999999 is not taken for a
      number below 1: it is 1.0 in float32, and values beyond float32's
      range are inf).
    inf_ok: accept +inf itself (if ``ok`` passes it), but not a finite value
      that is inf in float32.
  """
  value_here = _on_host(value)
  if _traced_scalar(value_here):
    return
  v = _concrete(value_here)
  if v is None:
    raise ValueError(f"`{name}` must be {allowed}; got {value!r}.")

  def passes(x: float) -> bool:
    return (math.isfinite(x) or (inf_ok and x == math.inf)) and ok(x)

  if float32:
    with np.errstate(over="ignore"):
      v32 = float(np.float32(v))
    # A finite value beyond float32's range is refused even where inf is
    # allowed: converting it would overflow (and warn); pass inf itself.
    overflows = math.isfinite(v) and not math.isfinite(v32)
    if passes(v) and (overflows or not passes(v32)):
      raise ValueError(f"`{name}` must be {allowed}; got {value!r}, which is "
                       f"{v32!r} in float32, the precision the transform "
                       "computes in.")
    v = v32
  if not passes(v):
    raise ValueError(f"`{name}` must be {allowed}; got {value!r}.")


def check_int(name: str, value: Any, minimum: int,
              maximum: int | None = None, *, static: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` is an integer in range.

  The range is ``[minimum, maximum]`` (no upper bound when ``maximum`` is
  None). Bools and floats (even integral ones) are rejected; a scalar
  tracer is accepted without reading its value and a concrete jax array is
  read, as in `check_number`, unless ``static``: a value that sets a shape
  must be a Python or NumPy integer.
  """
  allowed = (f"an integer >= {minimum}" if maximum is None
             else f"an integer in [{minimum}, {maximum}]")
  if static and isinstance(value, jax.Array):
    raise ValueError(
        f"`{name}` must be a Python int (it sets the state's shape); got a "
        "jax array. With optax.inject_hyperparams pass "
        f"static_args=('{name}',).")
  value_here = _on_host(value)
  if _traced_scalar(value_here):
    return
  integral = (
      isinstance(value_here, (numbers.Integral, np.integer))
      or (isinstance(value_here, np.ndarray) and value_here.ndim == 0
          and value_here.dtype.kind in "iu"))
  if not integral or isinstance(value_here, (bool, np.bool_)):
    raise ValueError(f"`{name}` must be {allowed}; got {value!r}.")
  # Compared as Python ints: a float would round integers above 2**53.
  i = int(value_here)
  if i < minimum or (maximum is not None and i > maximum):
    raise ValueError(f"`{name}` must be {allowed}; got {value!r}.")


def check_bool(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is a bool (or a 0-d bool array)."""
  if isinstance(value, (bool, np.bool_)):
    return
  if (isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0
      and value.dtype == np.bool_):
    return
  raise ValueError(f"`{name}` must be a bool; got {value!r}.")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
  """Returns ``value`` lower-cased, or raises ``ValueError``."""
  if isinstance(value, str) and value.lower() in choices:
    return value.lower()
  raise ValueError(f"`{name}` must be one of {list(choices)}; got {value!r}.")


def _kind(node: Any) -> str:
  """A node's kind in a few words: a NamedTuple by its class name."""
  if node is None:
    return "None"
  if hasattr(type(node), "_fields"):
    return type(node).__name__
  if hasattr(node, "shape") and hasattr(node, "dtype"):
    return "array"
  return type(node).__name__


def _article(noun: str) -> str:
  return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _summary(node: Any) -> str:
  """What a state is, for a message: ``a tuple of (ScaleByAdamState,
  EmptyState)``, ``a dict with keys ['count', 'mean']``, ``None``."""
  if node is None or hasattr(type(node), "_fields"):
    return _kind(node) if node is None else _article(_kind(node))
  if isinstance(node, (tuple, list)):
    kinds = [_kind(x) for x in node[:4]] + (["..."] if len(node) > 4 else [])
    return f"{_article(type(node).__name__)} of ({', '.join(kinds)})"
  if isinstance(node, Mapping):
    keys = [repr(k) for k in list(node.keys())[:6]]
    keys += ["..."] if len(node) > 6 else []
    return f"{_article(type(node).__name__)} with keys [{', '.join(keys)}]"
  if hasattr(node, "shape") and hasattr(node, "dtype"):
    return (f"an array of shape {tuple(node.shape)} and dtype "
            f"{np.dtype(node.dtype).name}")
  return _article(type(node).__name__)


def _field_names(node: Any) -> tuple[str, ...] | None:
  """The field names of a NamedTuple, or the string keys of a mapping (what
  Orbax restores a NamedTuple as without a target); else None."""
  if hasattr(type(node), "_fields"):
    return tuple(type(node)._fields)
  if isinstance(node, Mapping) and node and all(
      isinstance(k, str) for k in node):
    return tuple(node)
  return None


def _path_to(node: Any, cls: type) -> str | None:
  """Where a ``cls`` lies inside ``node`` (``[0]``, ``.inner_state[0]``),
  or None."""
  found = jax.tree_util.tree_flatten_with_path(
      node, is_leaf=lambda x: isinstance(x, cls))[0]
  for path, leaf in found:
    if isinstance(leaf, cls):
      return jax.tree_util.keystr(path)
  return None


def check_state(name: str, state: Any, cls: type, hint: str = "") -> None:
  """Raises `TypeError` unless ``state`` is the ``cls`` that ``name``'s
  ``init`` builds.

  Called at the top of each ``update``, so that another transform's state
  (the chain's, AdamW's, a checkpoint's plain dicts) is refused with what
  was expected, what came and the fix, rather than an `AttributeError` from
  deep inside the rule. The type of a pytree node is static, so under
  `jax.jit` this runs once per trace and costs nothing per step. A state
  keeps its class wherever it legitimately travels: `jax.jit`, `jax.vmap`,
  Optax's wrappers (``inject_hyperparams``, ``MultiSteps``,
  ``apply_if_finite``, ``multi_transform``), an Orbax restore into a
  target, and ``nnx.Optimizer``, which rebuilds it with `jax.tree.map`. A
  class of the same name and fields (its module reloaded) passes too.

  Args:
    name: the transform's name, which starts the message.
    state: the state ``update`` was given.
    cls: the state's class, a NamedTuple.
    hint: a sentence appended to the message (a fix of that transform's
      own).
  """
  if isinstance(state, cls):
    return
  own = type(state)
  if (getattr(own, "_fields", None) == cls._fields
      and own.__name__ == cls.__name__):
    return
  want = cls.__name__
  lines = [f"{name}: update() got {_summary(state)} as its state, not the "
           f"{want} its init() builds."]
  fields = _field_names(state)
  inside = None if fields else _path_to(state, cls)
  if fields and set(fields) <= set(cls._fields) and len(fields) > 1:
    missing = [f for f in cls._fields if f not in fields]
    lines.append(
        (f"It lacks {want}'s fields {missing}: a state saved by an "
         "older release" if missing else
         f"It has {want}'s fields but is not one: a checkpoint restored "
         "without a target")
        + "; bring it to today's layout with "
        "optax_zclip.migrate_state(restored, tx.init(params)).")
  elif inside is not None:
    lines.append(
        f"It holds a {want} at state{inside}: it is the state of a chain "
        "or wrapper around this transform; give it to that one's "
        "update().")
  lines.append(
      "Pass this transform's own state, what its init() or last update() "
      "returned (in optax.chain, the chain's whole state to the chain's "
      "update).")
  if hint:
    lines.append(hint)
  raise TypeError(" ".join(lines))
