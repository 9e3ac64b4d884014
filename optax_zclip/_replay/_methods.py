"""Method specs ("zclip:z_thresh=2|2.5", "clip@1") and what they build."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optax

from optax_zclip._autoclip import autoclip
from optax_zclip._clip import clip_by_global_norm
from optax_zclip._skip import skip_spikes
from optax_zclip._zclip import zclip

DEFAULT_METHODS = "zclip,clip@1,autoclip,skip"



def _skip(window: int = 128, sigma: float = 6.0):
  # The norm test reads the incoming norm, so the inner optimizer does not
  # matter; the identity passes the norm through for `out_norm`.
  return skip_spikes(optax.identity(), window=window, sigma=sigma)


_FACTORIES: dict[str, Callable[..., Any]] = {
    "zclip": zclip, "clip": clip_by_global_norm, "autoclip": autoclip,
    "skip": _skip}
# Arguments that only enter the computation as numbers: they are passed to
# the factory as traced scalars, so that one compiled replay serves every
# value (a sweep is one vmapped scan). The others set shapes or branches.
_TRACED = {"zclip": ("alpha", "z_thresh", "max_grad_norm", "eps",
                     "warmup_steps", "clip_factor"),
           "clip": ("max_norm",), "autoclip": ("percentile",),
           "skip": ("sigma",)}
_INTS = ("warmup_steps",)
_ADAGC = ("AdaGC clips each tensor by its own norm history, and a log holds "
          "only the global norm, so it cannot be replayed")


def _arguments(kind: str) -> dict[str, Any]:
  """The factory's arguments and their defaults (``inspect.Parameter.empty``
  where there is none), ``axis_name`` left out."""
  params = inspect.signature(_FACTORIES[kind]).parameters
  return {n: p.default for n, p in params.items() if n != "axis_name"}


def _value(text: str) -> Any:
  """A spec's value: None, a bool, an int, a float or a string."""
  low = text.strip().lower()
  if low == "none":
    return None
  if low in ("true", "false"):
    return low == "true"
  try:
    return int(low)
  except ValueError:
    pass
  try:
    return float(low)
  except ValueError:
    return text.strip()


def _split_methods(text: str) -> list[str]:
  """``"zclip:z_thresh=2,alpha=0.9,clip@1"`` -> one string per method: a
  comma-separated ``name=value`` continues the method before it."""
  out: list[str] = []
  for token in text.split(","):
    token = token.strip()
    if not token:
      raise ValueError(f"empty method in {text!r}")
    if re.fullmatch(r"[A-Za-z_]\w*=.*", token):
      if not out or ":" not in out[-1]:
        raise ValueError(f"argument {token!r} does not follow a method with "
                         "arguments (write kind:name=value,name=value)")
      out[-1] += "," + token
    else:
      out.append(token)
  return out


@dataclasses.dataclass(frozen=True)
class _Spec:
  """One method named by a spec: its label, kind and arguments."""

  name: str
  kind: str
  kwargs: tuple[tuple[str, Any], ...]


def _parse_spec(text: str) -> list[_Spec]:
  """One spec -> one `_Spec` per combination of its swept values."""
  head, _, args = text.partition(":")
  kind, at, threshold = head.strip().partition("@")
  kind = kind.strip().lower()
  if kind == "adagc":
    raise ValueError(f"{text!r}: {_ADAGC}")
  if kind not in _FACTORIES:
    raise ValueError(f"{text!r}: unknown method {kind!r}; the methods are "
                     "zclip, clip@<max_norm>, autoclip and skip")
  known = _arguments(kind)
  given: dict[str, list[str]] = {}
  if at:
    if kind != "clip":
      raise ValueError(f"{text!r}: only clip takes @<max_norm>")
    given["max_norm"] = threshold.split("|")
  for item in (args.split(",") if args.strip() else []):
    name, eq, value = item.partition("=")
    name = name.strip()
    if not eq or not name:
      raise ValueError(f"{text!r}: expected name=value, got {item!r}")
    if name not in known:
      raise ValueError(f"{text!r}: {kind} has no argument {name!r}; it takes "
                       f"{', '.join(known)}")
    if name in given:
      raise ValueError(f"{text!r}: {name!r} given twice")
    given[name] = value.split("|")
  missing = [n for n, d in known.items()
             if d is inspect.Parameter.empty and n not in given]
  if missing:
    raise ValueError(f"{text!r}: {kind} needs {missing[0]} (clip@1 clips "
                     "at 1)")
  for name, values in given.items():
    if any(not v.strip() for v in values):
      raise ValueError(f"{text!r}: empty value for {name!r}")
  swept = [n for n, v in given.items() if len(v) > 1]
  specs = []
  for combo in itertools.product(*given.values()):
    kwargs = tuple((n, _value(v)) for n, v in zip(given, combo, strict=True))
    if swept:
      # The label fixes each swept value: clip@1, zclip:z_thresh=2.5,alpha=..
      values = dict(zip(given, combo, strict=True))
      shown = [f"{n}={values[n].strip()}" for n in given
               if not (at and n == "max_norm")]
      name = (f"{kind}@{values['max_norm'].strip()}" if at else kind)
      name += (":" + ",".join(shown)) if shown else ""
    else:
      name = text.strip()
    specs.append(_Spec(name, kind, kwargs))
  return specs


def _parse_methods(methods: Any) -> list[tuple[str, Any]]:
  """``methods`` as given to `replay` -> ``[(name, _Spec or transform)]``."""
  if isinstance(methods, str):
    methods = _split_methods(methods)
  items: list[tuple[str, Any]] = []
  if isinstance(methods, Mapping):
    for name, m in methods.items():
      if not isinstance(name, str) or not name:
        raise ValueError(f"a method's name must be a non-empty string; got "
                         f"{name!r}")
      if isinstance(m, str):
        specs = _parse_spec(m)
        if len(specs) > 1:
          raise ValueError(f"method {name!r}: a sweep ({m!r}) names several "
                           "methods; give it in a list, not a mapping")
        items.append((name, dataclasses.replace(specs[0], name=name)))
      elif isinstance(m, optax.GradientTransformation):
        items.append((name, m))
      else:
        raise ValueError(f"method {name!r} must be a spec string or an "
                         f"optax.GradientTransformation; got {m!r}")
  elif isinstance(methods, Sequence):
    for m in methods:
      if not isinstance(m, str):
        raise ValueError("a list of methods holds spec strings (give "
                         "transforms as a mapping name -> transform); got "
                         f"{m!r}")
      items += [(s.name, s) for s in _parse_spec(m)]
  else:
    raise ValueError("`methods` must be a string, a list of strings or a "
                     f"mapping; got {methods!r}")
  if not items:
    raise ValueError("no methods to replay")
  names = [n for n, _ in items]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ValueError(f"method {twice[0]!r} is named twice")
  return items


def zclip_cap(name: str) -> tuple[Any, str] | None:
  """(its cap, the spec without it) of a method named by a ZClip spec:
  ``"zclip:z_thresh=3"`` -> ``(1.0, "zclip:z_thresh=3,max_grad_norm=none")``;
  None for any other name."""
  try:
    specs = _parse_spec(name)
  except ValueError:
    return None
  if len(specs) != 1 or specs[0].kind != "zclip":
    return None
  cap = dict(specs[0].kwargs).get("max_grad_norm",
                                  _arguments("zclip")["max_grad_norm"])
  head, _, args = name.partition(":")
  kept = [a.strip() for a in args.split(",")
          if a.strip() and a.partition("=")[0].strip() != "max_grad_norm"]
  return cap, f"{head.strip()}:{','.join([*kept, 'max_grad_norm=none'])}"
