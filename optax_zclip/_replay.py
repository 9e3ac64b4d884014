"""Replay: what each clipping rule would have done to a run already logged.

`replay` feeds a logged series of global gradient norms (and losses) to the
package's own transforms, one step after another under one `jax.lax.scan`,
and reads what they did from their telemetry (`optax_zclip.stats`). `main` is
the command ``python -m optax_zclip.replay``: it reads a log (CSV, JSON
lines, a Hugging Face ``trainer_state.json`` or one number per line), replays
it and writes a CSV, a plot and a table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import re
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_zclip._autoclip import autoclip
from optax_zclip._clip import clip_by_global_norm
from optax_zclip._skip import skip_spikes
from optax_zclip._stats import stats
from optax_zclip._zclip import zclip

DEFAULT_METHODS = "zclip,clip@1,autoclip,skip"
F32 = jnp.float32


# --------------------------------------------------------------------------
# Methods: specs such as "zclip:z_thresh=2|2.5|3" and the transforms they
# name.


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


# --------------------------------------------------------------------------
# The replay itself.


@dataclasses.dataclass(frozen=True)
class _Build:
  """Builds a spec's transform from its static and traced arguments."""

  kind: str
  static: tuple[tuple[str, Any], ...]

  def __call__(self, **traced):
    return _FACTORIES[self.kind](**dict(self.static), **traced)


@dataclasses.dataclass(frozen=True)
class _Given:
  """A transform given as an object. Equal for the same ``init`` and
  ``update`` functions, so that replaying one transform again reuses its
  compiled scan."""

  tx: Any

  def __call__(self):
    return self.tx


def _roles(name: str, tx: optax.GradientTransformation
           ) -> tuple[str | None, bool]:
  """(kind of the clipping state or None, whether it skips), from the keys
  of `stats` of ``tx``'s initial state."""
  keys = list(jax.eval_shape(
      lambda: stats(tx.init(jnp.zeros([1], F32)))).keys())
  kinds = [k.split("/")[0] for k in keys]
  repeated = sorted({k.split("[")[0] for k in kinds if "[" in k})
  if repeated:
    raise ValueError(f"method {name!r} holds more than one {repeated[0]} "
                     "state; replay one clipping transform per method")
  kinds = list(dict.fromkeys(kinds))
  if "adagc" in kinds:
    raise ValueError(f"method {name!r}: {_ADAGC}")
  clippers = [k for k in kinds if k != "skip"
              and {f"{k}/grad_norm", f"{k}/clipped_norm"} <= set(keys)]
  if len(clippers) > 1:
    raise ValueError(f"method {name!r} holds {' and '.join(clippers)}; "
                     "replay one clipping transform per method")
  clipper = clippers[0] if clippers else None
  has_skip = "skip" in kinds
  if clipper is None and not has_skip:
    raise ValueError(f"method {name!r} has no clipping or skipping state of "
                     "optax_zclip (optax_zclip.stats finds none)")
  return clipper, has_skip


def _record(s: dict, clipper: str | None, has_skip: bool) -> dict:
  """One step's outputs from its telemetry."""
  if has_skip:
    g = s["skip/grad_norm"]
    skipped = s["skip/skipped"] > 0
  else:
    g = s[f"{clipper}/grad_norm"]
    skipped = jnp.zeros([], bool)
  if clipper is not None:
    threshold = s.get(f"{clipper}/threshold", jnp.full([], jnp.inf, F32))
    out = s[f"{clipper}/clipped_norm"]
  else:
    threshold, out = s["skip/norm_threshold"], g
  out = jnp.where(skipped, jnp.zeros([], F32), out)
  # A skipped step counts as clipped (to zero), a NaN or Inf one included,
  # whose `out < g` is False.
  return {"threshold": threshold.astype(F32), "out_norm": out.astype(F32),
          "clipped": skipped | (out < g), "skipped": skipped}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _run(build, clipper, has_skip, with_loss, hparams, norms, losses,
         has_loss):
  """Every member of one group of methods (``hparams``'s leading axis), the
  whole series each, under one scan."""
  params = jnp.zeros([1], F32)

  def one(_, hp):
    tx = optax.with_extra_args_support(build(**hp))

    def body(state, x):
      g, loss, given = x
      u = jnp.reshape(g, [1])
      if with_loss == "some":
        _, state = jax.lax.cond(
            given, lambda s: tx.update(u, s, params, value=loss),
            lambda s: tx.update(u, s, params), state)
      elif with_loss == "all":
        _, state = tx.update(u, state, params, value=loss)
      else:
        _, state = tx.update(u, state, params)
      return state, _record(stats(state), clipper, has_skip)

    return jax.lax.scan(body, tx.init(params), (norms, losses, has_loss))[1]

  size = jax.tree.leaves(hparams)[0].shape[0] if hparams else 1
  return jax.vmap(one)(jnp.arange(size), hparams)


def _as_losses(losses: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(float32 losses, whether each step has one)."""
  if isinstance(losses, np.ma.MaskedArray):
    given = ~np.ma.getmaskarray(losses).reshape(-1)
    values = np.ma.filled(losses.astype(np.float64), 0.0).reshape(-1)
  else:
    seq = np.asarray(losses, dtype=object)
    if seq.ndim != 1:
      raise ValueError("`losses` must be one-dimensional, one loss per norm; "
                       f"got shape {seq.shape}")
    given = np.array([v is not None for v in seq], bool)
    try:
      values = np.array([0.0 if v is None else float(v) for v in seq])
    except (TypeError, ValueError):
      raise ValueError("`losses` must hold numbers or None") from None
  if np.ndim(losses) != 1 or values.size != n:
    raise ValueError(f"`losses` must have one entry per norm ({n}); got "
                     f"shape {np.shape(losses)}")
  with np.errstate(over="ignore"):
    return values.astype(np.float32), given


def replay(norms: Any, losses: Any = None,
           methods: str | Sequence[str] | Mapping[str, Any] = DEFAULT_METHODS,
           *, steps: Any = None) -> dict[str, np.ndarray]:
  """What each clipping rule would have done to a run, from its logged norms.

  Feeds the logged global gradient norms, step after step, to each method's
  own transform from this package (a one-element gradient whose global norm
  is the logged norm; for `skip_spikes`, the logged loss as ``value=``),
  under one `jax.lax.scan`, and reads from its telemetry
  (`optax_zclip.stats`) what it did. ZClip's and the skip rule's decisions
  depend only on the series of norms and losses, so for a run that used
  ZClip, replaying its logged pre-clip norms with its settings gives back
  its thresholds and decisions exactly.

  A replay is **open loop**: in a real run, clipping a step changes the
  gradients after it, while here every method sees the norms the logged run
  produced. It answers which steps a rule would have touched, and how hard,
  not what the loss would have been.

  The norms are taken in float32, as the transforms compute them. A NaN or
  Inf norm (or loss) is a non-finite step, treated as the transform treats
  it: the clipping transforms pass it through and leave their statistics
  alone, `skip_spikes` skips it. Every group of methods of one kind that
  differ only in numeric arguments (a sweep) runs as one compiled, vmapped
  scan, compiled once: 100,000 steps of ZClip, the fixed threshold or the
  skip rule take a fraction of a second on a CPU after a compilation of
  about a second (AutoClip, which sorts its window of norms at every step,
  about ten seconds).

  Methods are named by spec strings (the command's syntax), or given as
  transforms:

  * ``"zclip"``: `zclip` with its defaults (``max_grad_norm=1.0``
    included); ``"zclip:z_thresh=3,max_grad_norm=none"`` with arguments
    (``none``, ``true``, ``false``, numbers and words are understood);
  * ``"clip@1"``: `clip_by_global_norm` at 1.0;
  * ``"autoclip"``, ``"autoclip:percentile=5"``: `autoclip`;
  * ``"skip"``, ``"skip:window=64,sigma=5"``: `skip_spikes` around
    ``optax.identity()`` (the test reads the incoming norm, and the losses
    when given);
  * a sweep, ``"zclip:z_thresh=2|2.5|3"`` or ``"clip@0.5|1|2"``: one method
    per value (per combination, when several arguments are swept), each
    labelled with its value (``"zclip:z_thresh=2.5"``);
  * in a mapping, any `optax.GradientTransformation` holding one clipping
    state of this package (`zclip`, `clip_by_global_norm`, `autoclip`),
    possibly inside `skip_spikes`, optionally chained with an optimizer:
    ``{"zclip+skip": optax_zclip.skip_spikes(optax_zclip.zclip())}``.

  `adagc` clips each tensor by its own norm history, which a log of the
  global norm does not hold: it is refused with a `ValueError`.

  Args:
    norms: the logged global gradient norms (before clipping), one per step,
      in order: a one-dimensional sequence of numbers >= 0, NaN or Inf.
    losses: None, or the logged losses, one per norm, for `skip_spikes`'
      loss test; None entries (or masked entries of a NumPy masked array)
      mark steps without a loss, which only the norm test sees. A NaN loss
      is a non-finite step, which `skip_spikes` skips.
    methods: what to replay: a comma-separated string of specs (as on the
      command line, default ``"zclip,clip@1,autoclip,skip"``), a list of
      specs, or a mapping from a name to a spec or to a transform (see
      above).
    steps: the step number of each norm, copied to the result's ``"step"``
      (default ``0, 1, ...``); it only labels the rows, the replay takes the
      norms in the order given.

  Returns:
    A dict of one-dimensional NumPy arrays, one entry per step, in the order
    of the command's ``replay.csv``: ``"step"``, ``"grad_norm"`` (the norms
    as given) and, for each method ``m``, ``"m/threshold"`` (float32: the
    norm above which the step would have been clipped, as the transform's
    state reports it; for `skip_spikes` alone, its norm test's threshold;
    ``inf`` where there is none), ``"m/out_norm"`` (float32: the norm after
    the method, the norm times the scale it applied, 0 on a skipped step),
    ``"m/clipped"`` (bool: ``out_norm < norm``, or the step skipped, a NaN
    or Inf one included) and, for a method that
    skips, ``"m/skipped"`` (bool). When `skip_spikes` wraps a clipping
    transform, the threshold is the clipping transform's (on a skipped step,
    that of the last step taken).

  Raises:
    ValueError: if ``norms`` is empty, not one-dimensional, or holds a
      negative or non-numeric value; if ``losses`` or ``steps`` does not
      have one entry per norm; if a spec is malformed, names an unknown
      method or argument, or gives an argument out of its range (the
      transform's own message); if a method is AdaGC, holds no clipping
      state of this package or more than one.

  Example:
    >>> import optax_zclip
    >>> norms = [1.0, 1.2, 0.9, 1.1, 6.0, 1.0]
    >>> z = "zclip:warmup_steps=3,max_grad_norm=none"
    >>> out = optax_zclip.replay(norms, methods=["clip@1", z])
    >>> out["clip@1/out_norm"]
    array([1. , 1. , 0.9, 1. , 1. , 1. ], dtype=float32)
    >>> out[z + "/clipped"]
    array([False, False, False, False,  True, False])
    >>> print(f"{out[z + '/threshold'][4]:.3f} {out[z + '/out_norm'][4]:.3f}")
    1.344 1.054

  References:
    Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
    <https://arxiv.org/abs/2504.02507>`_, 2025. The skip rule: OLMo-core's
    ``SkipStepOptimizer`` (see `skip_spikes`).
  """
  try:
    g = np.asarray(norms, dtype=np.float64)
  except (TypeError, ValueError):
    raise ValueError("`norms` must hold numbers (drop the steps that were "
                     "not logged)") from None
  if g.ndim != 1:
    raise ValueError("`norms` must be one-dimensional, one global norm per "
                     f"step; got shape {g.shape}")
  if g.size == 0:
    raise ValueError("`norms` is empty")
  negative = np.flatnonzero(g < 0)
  if negative.size:
    raise ValueError(f"`norms` holds a negative norm, "
                     f"{float(g[negative[0]])!r} at index {negative[0]}")
  n = g.size
  if steps is None:
    step = np.arange(n)
  else:
    step = np.asarray(steps)
    if step.shape != (n,):
      raise ValueError(f"`steps` must have one entry per norm ({n}); got "
                       f"shape {step.shape}")
  with np.errstate(over="ignore"):
    g32 = g.astype(np.float32)
  if losses is None:
    loss32, given = np.zeros(n, np.float32), np.zeros(n, bool)
  else:
    loss32, given = _as_losses(losses, n)

  items = _parse_methods(methods)
  # Build every method once on the host: the factories check the arguments
  # here (a ValueError naming the argument), before anything is compiled.
  groups: dict[tuple, list[tuple[str, dict]]] = {}
  roles = {}
  for name, m in items:
    if isinstance(m, _Spec):
      try:
        tx = _FACTORIES[m.kind](**dict(m.kwargs))
      except ValueError as e:
        raise ValueError(f"method {name!r}: {e}") from None
      full = {**_arguments(m.kind), **dict(m.kwargs)}
      traced = {k: v for k, v in full.items()
                if k in _TRACED[m.kind] and v is not None}
      static = tuple((k, v) for k, v in full.items() if k not in traced)
      build: Any = _Build(m.kind, static)
    else:
      tx, traced, build = m, {}, _Given(m)
    roles[name] = _roles(name, tx)
    key = (build, *roles[name], tuple(traced))
    groups.setdefault(key, []).append((name, traced))

  result: dict[str, np.ndarray] = {"step": step, "grad_norm": g}
  outputs = {}
  for (build, clipper, has_skip, _), members in groups.items():
    hparams = {k: np.array([t[k] for _, t in members],
                           np.int32 if k in _INTS else np.float32)
               for k in members[0][1]}
    # Only a skip rule reads the loss. With a loss at some steps and not at
    # others, each step takes the update with or without ``value=``.
    with_loss = ("none" if not has_skip or not given.any()
                 else "all" if given.all() else "some")
    out = jax.device_get(_run(build, clipper, has_skip, with_loss, hparams,
                              g32, loss32, given))
    for i, (name, _) in enumerate(members):
      outputs[name] = ({k: np.asarray(v[i]) for k, v in out.items()},
                       has_skip)
  for name, _ in items:
    out, has_skip = outputs[name]
    for field in ("threshold", "out_norm", "clipped"):
      result[f"{name}/{field}"] = out[field]
    if has_skip:
      result[f"{name}/skipped"] = out["skipped"]
  return result


# --------------------------------------------------------------------------
# The command: reading a log.

PROG = "python -m optax_zclip.replay"
# `skip_spikes`'s norm before the clipping ones: it is every step's norm,
# while a clipping transform inside `skip_spikes` keeps the last taken step's
# on a skipped step (its state is not updated), hiding the very spikes.
NORM_NAMES = ("grad_norm", "train/grad_norm", "gradient_norm",
              "train/gradient_norm", "skip/grad_norm", "zclip/grad_norm",
              "clip/grad_norm", "autoclip/grad_norm", "adagc/grad_norm",
              "Value")
LOSS_NAMES = ("loss", "train/loss", "train_loss")
STEP_NAMES = ("step", "_step", "Step", "global_step", "train/global_step",
              "trainer/global_step")


class LogError(ValueError):
  """A log the command cannot replay; the message is one line."""


@dataclasses.dataclass
class _Table:
  """A log's rows, each a mapping from column to its raw value."""

  fmt: str
  columns: list[str]
  rows: list[tuple[str, dict]]  # (where it is in the file, values)


@dataclasses.dataclass
class _Log:
  """The series a log holds, and where they came from."""

  fmt: str
  columns: list[str]
  norm_column: str | None
  loss_column: str | None
  step_column: str | None
  steps: np.ndarray
  norms: np.ndarray
  losses: list | None  # a float or None per step
  left_out: int  # rows without a norm
  notes: list[str]


def _flatten(obj: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in obj.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _json_rows(path: str, objs: list, where: Callable[[int], str]) -> _Table:
  rows, columns = [], {}
  for i, obj in enumerate(objs):
    if not isinstance(obj, dict):
      raise LogError(f"{where(i)} is not a JSON object")
    flat = _flatten(obj)
    columns.update(dict.fromkeys(flat))
    rows.append((where(i), flat))
  return _Table("", list(columns), rows)


def _read_table(path: str) -> _Table:
  """Reads a log file into rows, recognising its format by its content."""
  if not os.path.exists(path):
    raise LogError(f"{path}: no such file")
  if os.path.isdir(path):
    raise LogError(f"{path} is a directory, not a log file")
  try:
    with open(path, encoding="utf-8", newline="") as f:
      text = f.read()
  except UnicodeDecodeError:
    raise LogError(f"{path} is not a text file (UTF-8)") from None
  except OSError as e:
    raise LogError(f"{path}: {e.strerror}") from None
  body = text.lstrip()
  if not body:
    raise LogError(f"{path} is empty")
  if body[0] in "{[":
    try:
      obj = json.loads(text)
    except json.JSONDecodeError:
      obj = None  # JSON lines
    if isinstance(obj, dict) and "log_history" in obj:
      history = obj["log_history"]
      if not isinstance(history, list):
        raise LogError(f"{path}: log_history is not a list")
      table = _json_rows(path, history, lambda i: f"{path} log_history[{i}]")
      table.fmt = "Hugging Face trainer_state.json"
      return table
    if isinstance(obj, dict) and "\n" in text.strip():
      raise LogError(f"{path} is a JSON object without log_history (not a "
                     "Hugging Face trainer_state.json, nor JSON lines)")
    if isinstance(obj, list):
      table = _json_rows(path, obj, lambda i: f"{path} item {i}")
      table.fmt = "JSON"
      return table
    objs, lines = [], []
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          objs.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise LogError(f"{path} line {n} is not JSON ({e.msg})") from None
        lines.append(n)
    table = _json_rows(path, objs, lambda i: f"{path} line {lines[i]}")
    table.fmt = "JSON lines"
    return table
  lines = text.splitlines()
  first = next(line.strip() for line in lines
               if line.strip() and not line.lstrip().startswith("#"))
  try:
    float(first)
  except ValueError:
    pass
  else:
    rows = []
    for n, line in enumerate(lines, 1):
      t = line.strip()
      if t and not t.startswith("#"):
        rows.append((f"{path} line {n}", {"": t}))
    return _Table("one number per line", [], rows)
  delimiter = "\t" if "\t" in first and "," not in first else ","
  reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
  header = [c.strip() for c in next(reader)]
  rows = []
  for cells in reader:
    if not any(c.strip() for c in cells):
      continue
    where = f"{path} line {reader.line_num}"
    if len(cells) > len(header):
      raise LogError(f"{where} has {len(cells)} values for {len(header)} "
                     "columns")
    rows.append((where, dict(zip(header, cells, strict=False))))
  return _Table("CSV", header, rows)


def _number(raw: Any, where: str, column: str) -> float | None:
  """A cell as a float; None for an empty cell (a value not logged)."""
  if raw is None:
    return None
  if isinstance(raw, (int, float)) and not isinstance(raw, bool):
    return float(raw)
  if isinstance(raw, str):
    if not raw.strip():
      return None
    try:
      return float(raw)
    except ValueError:
      pass
  label = f"column {column!r} holds" if column else "holds"
  raise LogError(f"{where}: {label} {raw!r}, not a number")


def _norm_like(columns: Sequence[str]) -> list[str]:
  """The columns that could hold a gradient norm, in the file's order."""
  return [c for c in columns if c.endswith("grad_norm") or c in NORM_NAMES]


def _norm_note(chosen: str, columns: Sequence[str]) -> list[str]:
  """Which norm column was read when the log has others that could be."""
  others = [c for c in _norm_like(columns) if c != chosen]
  if not others:
    return []
  why = (" (skip_spikes's norm of every step, before clipping: a clipping "
         "transform inside skip_spikes logs the last taken step's norm on a "
         "skipped step)" if chosen == "skip/grad_norm" else "")
  return [f"the norms are column {chosen!r}{why}; the log also has "
          f"{', '.join(repr(c) for c in others)}: --norm-column to replay "
          "another"]


def _pick(table: _Table, given: str | None, names: Sequence[str],
          what: str, option: str, path: str) -> str | None:
  """The column to read: the one given (checked), else a known name."""
  if given is not None:
    if given not in table.columns:
      raise LogError(f"{path} has no column {given!r} ({option}); its "
                     f"columns: {', '.join(table.columns) or '(none)'}")
    return given
  for name in names:
    if name in table.columns:
      return name
  if what == "norm":
    ending = _norm_like(table.columns)
    if len(ending) == 1:
      return ending[0]
    if ending:
      raise LogError(f"{path}: {len(ending)} columns could be the gradient "
                     f"norm ({', '.join(ending)}); choose one with "
                     "--norm-column")
    raise LogError(f"{path}: no column looks like the gradient norm; give "
                   f"it with --norm-column (its columns: "
                   f"{', '.join(table.columns) or '(none)'})")
  return None


def _matches(raw: Any, want: str) -> bool:
  if raw is None:
    return False
  if isinstance(raw, bool):
    return want.lower() == str(raw).lower()
  if str(raw).strip() == want:
    return True
  try:
    return float(raw) == float(want)
  except (TypeError, ValueError):
    return False


def _step_notes(steps: np.ndarray, wheres: list[str]) -> list[str]:
  n = len(steps)
  if n < 2:
    return []
  d = np.diff(steps)
  back = np.flatnonzero(d <= 0)
  if back.size:
    i = back[0]
    return [f"the steps do not increase (step {steps[i + 1]} follows step "
            f"{steps[i]} at {wheres[i + 1]}); the rows are replayed in the "
            "order of the file"]
  if np.all(d == 1):
    return []
  if np.all(d == d[0]):
    return [f"a norm every {d[0]} steps: a subsampled series. It is replayed "
            f"as the {n} steps it has, one after another, so a method's "
            f"warm-up and windows span {d[0]} times as many training steps "
            "as in a run, and the steps between are not seen"]
  missing = int(steps[-1] - steps[0] + 1 - n)
  return [f"the steps have gaps ({n} norms over steps {steps[0]} to "
          f"{steps[-1]}, {missing} steps without one): they are replayed as "
          f"the {n} steps the log has, one after another"]


def read_log(path: str, norm_column: str | None = None,
             loss_column: str | None = None, step_column: str | None = None,
             where: Sequence[str] = ()) -> _Log:
  """Reads the series to replay from a log file; `LogError` if it cannot."""
  table = _read_table(path)
  if not table.columns:  # one number per line
    for option, value in (("--norm-column", norm_column),
                          ("--loss-column", loss_column),
                          ("--step-column", step_column)):
      if value is not None:
        raise LogError(f"{path} holds one number per line, without columns; "
                       f"leave out {option}")
    if where:
      raise LogError(f"{path} holds one number per line; leave out --where")
    norms = [_number(row[""], w, "") for w, row in table.rows]
    return _finish(path, table, None, None, None, norms, None, None,
                   [w for w, _ in table.rows])
  for cond in where:
    key, eq, want = cond.partition("=")
    if not eq:
      raise LogError(f"--where {cond!r}: expected COLUMN=VALUE")
    if key not in table.columns:
      raise LogError(f"{path} has no column {key!r} (--where); its columns: "
                     f"{', '.join(table.columns)}")
    table.rows = [r for r in table.rows if _matches(r[1].get(key), want)]
  if where and not table.rows:
    raise LogError(f"{path}: no row matches --where {' '.join(where)}")
  norm_col = _pick(table, norm_column, NORM_NAMES, "norm", "--norm-column",
                   path)
  loss_col = _pick(table, loss_column, LOSS_NAMES, "loss", "--loss-column",
                   path)
  step_col = _pick(table, step_column, STEP_NAMES, "step", "--step-column",
                   path)
  norms, losses, steps, wheres = [], [], [], []
  for w, row in table.rows:
    g = _number(row.get(norm_col), w, norm_col)
    if g is None:
      continue  # this row logged other values, not the norm
    norms.append(g)
    wheres.append(w)
    if loss_col is not None:
      losses.append(_number(row.get(loss_col), w, loss_col))
    if step_col is not None:
      s = _number(row.get(step_col), w, step_col)
      if s is None:
        raise LogError(f"{w}: a norm without a step in column {step_col!r}")
      if not float(s).is_integer():
        raise LogError(f"{w}: column {step_col!r} holds {s!r}, not a whole "
                       "step number")
      steps.append(int(s))
  left_out = len(table.rows) - len(norms)
  log = _finish(path, table, norm_col, loss_col, step_col, norms,
                losses if loss_col else None, steps if step_col else None,
                wheres)
  log.left_out = left_out
  if norm_column is None:
    log.notes[:0] = _norm_note(norm_col, table.columns)
  return log


def _finish(path, table, norm_col, loss_col, step_col, norms, losses, steps,
            wheres) -> _Log:
  kept = [(g, w) for g, w in zip(norms, wheres, strict=True) if g is not None]
  if not kept:
    what = f"column {norm_col!r}" if norm_col else "its lines"
    raise LogError(f"{path}: no norms to replay (no value in {what})")
  g = np.array([v for v, _ in kept], np.float64)
  bad = np.flatnonzero(g < 0)
  if bad.size:
    raise LogError(f"{kept[bad[0]][1]}: the norm {float(g[bad[0]])!r} is "
                   "negative")
  notes = []
  if steps is None:
    step = np.arange(len(g))
  else:
    step = np.array(steps, np.int64)
    notes += _step_notes(step, [w for _, w in kept])
  if losses is not None and all(v is None for v in losses):
    losses = None
  return _Log(table.fmt, table.columns, norm_col, loss_col, step_col, step,
              g, losses, len(norms) - len(kept), notes)


# --------------------------------------------------------------------------
# The command: what it writes and prints.

OPEN_LOOP = (
    "A replay is open loop: every method sees the norms the logged run "
    "produced. In a real run, clipping a step changes the gradients after "
    "it, so after a method's first clipped step the series is the one the "
    "unclipped run produced. The replay answers which steps each rule would "
    "have touched, and how hard, not what the loss would have been.")


def _methods_of(result: Mapping[str, np.ndarray]) -> list[str]:
  return [k[:-len("/threshold")] for k in result if k.endswith("/threshold")]


def summary_rows(result: Mapping[str, np.ndarray], warmup_end: int
                 ) -> list[dict]:
  """Per method: steps clipped, reductions, skips, and where they fall.

  ``warmup_end`` is the first step (by the result's ``"step"``) after the
  run's warm-up. The reduction of a clipped step is the norm before over
  the norm after (skipped steps are counted apart).
  """
  g = np.asarray(result["grad_norm"], np.float64)
  step = np.asarray(result["step"])
  early = step < warmup_end
  rows = []
  for m in _methods_of(result):
    out = np.asarray(result[f"{m}/out_norm"], np.float64)
    clipped = np.asarray(result[f"{m}/clipped"], bool)
    skipped = result.get(f"{m}/skipped")
    skipped = (np.zeros_like(clipped) if skipped is None
               else np.asarray(skipped, bool))
    cut = clipped & ~skipped & (out > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
      factor = g[cut] / out[cut]
    touched = clipped | skipped
    rows.append({
        "method": m, "clipped": int(clipped.sum()),
        "clipped_pct": 100.0 * clipped.mean(),
        "largest": float(factor.max()) if factor.size else None,
        "median": float(np.median(factor)) if factor.size else None,
        "skipped": int(skipped.sum()) if f"{m}/skipped" in result else None,
        "warmup": int((touched & early).sum()),
        "later": int((touched & ~early).sum())})
  return rows


def format_table(rows: list[dict]) -> str:
  """The per-method table the command prints."""
  head = ["method", "clipped", "largest cut", "median cut", "skipped",
          "in warm-up", "later"]
  body = []
  for r in rows:
    body.append([
        r["method"], f"{r['clipped']} ({r['clipped_pct']:.1f}%)",
        "-" if r["largest"] is None else f"{r['largest']:.2f}x",
        "-" if r["median"] is None else f"{r['median']:.2f}x",
        "-" if r["skipped"] is None else str(r["skipped"]),
        str(r["warmup"]), str(r["later"])])
  widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(x, widths, strict=True)))
           for x in [head, *body]]
  return "\n".join(lines)


def write_csv(path: str, result: Mapping[str, np.ndarray]) -> None:
  """``result`` as a CSV: a header of its keys, one row per step, flags 0/1,
  floats in their shortest exact form."""
  columns = []
  for v in result.values():
    v = np.asarray(v)
    if v.dtype == bool:
      columns.append(np.where(v, "1", "0"))
    else:
      columns.append(v.astype(str))
  with open(path, "w", newline="") as f:
    csv.writer(f, lineterminator="\n").writerow(list(result))
    f.writelines(",".join(cells) + "\n"
                 for cells in zip(*columns, strict=True))


def plot(path: str, result: Mapping[str, np.ndarray],
         losses: Sequence[float | None] | None = None,
         title: str = "") -> None:
  """The replay as a figure, written to ``path``.

  Top: the logged norm on a log axis and each method's threshold. Middle:
  one row per method, a tick at each step it clipped and a cross at each
  step it skipped. Bottom, when ``losses`` are given: the loss, with the
  skipped steps crossed. Needs matplotlib, imported here (the package does
  not need it).
  """
  import matplotlib  # noqa: F401, PLC0415 (optional: fails without it)
  from matplotlib.figure import Figure  # noqa: PLC0415

  step = np.asarray(result["step"])
  g = np.asarray(result["grad_norm"], np.float64)
  methods = _methods_of(result)
  loss = (None if losses is None else
          np.array([np.nan if v is None else v for v in losses], np.float64))
  ratios = [3.0, 0.35 + 0.22 * len(methods)] + ([1.3] if loss is not None
                                                else [])
  fig = Figure(figsize=(11, 1.3 * sum(ratios) + 0.8), layout="constrained")
  axes = fig.subplots(len(ratios), 1, sharex=True, height_ratios=ratios)
  ax, ax_ev = axes[0], axes[1]
  finite = np.isfinite(g) & (g > 0)
  ax.plot(step, np.where(finite, g, np.nan), color="0.55", lw=0.7,
          label="logged norm")
  for i, m in enumerate(methods):
    color = f"C{i % 10}"
    thr = np.asarray(result[f"{m}/threshold"], np.float64)
    ax.plot(step, np.where(np.isfinite(thr) & (thr > 0), thr, np.nan),
            color=color, lw=1.3, ls=("-", "--", "-.", ":")[i % 4],
            label=f"{m}: threshold")
    skipped = np.asarray(result.get(f"{m}/skipped", np.zeros(len(g), bool)),
                         bool)
    clipped = np.asarray(result[f"{m}/clipped"], bool) & ~skipped
    y = len(methods) - 1 - i
    ax_ev.scatter(step[clipped], np.full(clipped.sum(), y), marker="|",
                  s=80, lw=1.0, color=color)
    ax_ev.scatter(step[skipped], np.full(skipped.sum(), y), marker="x",
                  s=30, lw=1.2, color=color)
    if loss is not None and skipped.any():
      axes[2].scatter(step[skipped], loss[skipped], marker="x", s=30,
                      lw=1.2, color=color, zorder=3,
                      label=f"{m}: skipped")
  bad = ~np.isfinite(g)
  if bad.any():
    for a in axes:
      for t in step[bad]:
        a.axvline(t, color="red", lw=0.6, alpha=0.5)
    ax.plot([], [], color="red", lw=0.6, label="NaN/Inf norm")
  ax.set_yscale("log")
  ax.set_ylabel("global gradient norm")
  ax.grid(alpha=0.3, which="both", lw=0.4)
  ax.legend(fontsize="small", ncols=2 if len(methods) > 2 else 1,
            loc="upper right")
  if title:
    ax.set_title(title, fontsize="medium")
  ax_ev.set_yticks(range(len(methods)),
                   [f"{m}  ({int(np.sum(result[f'{m}/clipped']))})"
                    for m in reversed(methods)], fontsize="small")
  ax_ev.set_ylim(-0.7, len(methods) - 0.3)
  ax_ev.set_title("steps clipped (|) and skipped (x), per method (clipped "
                  "count)", fontsize="small", loc="left")
  ax_ev.grid(alpha=0.3, axis="x", lw=0.4)
  if loss is not None:
    axes[2].plot(step, loss, color="0.3", lw=0.7)
    axes[2].set_ylabel("loss")
    axes[2].grid(alpha=0.3, lw=0.4)
    if axes[2].collections:
      axes[2].legend(fontsize="small", loc="upper right")
  axes[-1].set_xlabel("step")
  fig.savefig(path, dpi=110)


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def _fill(text: str) -> str:
  return textwrap.fill(text, width=79, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    # One line, no usage: the same form as every other error of the command.
    self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
      prog=PROG,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=_fill(
          "Replays the gradient norms (and losses) of a run you logged "
          "through each clipping rule of optax_zclip, with the package's own "
          "transforms, and shows which steps each rule would have clipped "
          "or skipped, and how hard.") + "\n\n" + _fill(OPEN_LOOP),
      epilog="""\
LOG formats, recognised by their content:
  CSV with a header     TensorBoard and W&B exports. A row without a value in
                        the norm column (W&B leaves the cell empty when a row
                        logged other metrics) is not a step: it is left out.
                        NaN and inf are non-finite steps.
  JSON lines            one object per line, as the spike demo's
                        metrics.jsonl (nested objects give columns a/b);
                        --where picks one run of several.
  trainer_state.json    Hugging Face Transformers: the log_history entries with
                        a grad_norm (evaluation entries have none).
  one number per line   the norms alone.
Columns, when not given: the norm is grad_norm, train/grad_norm, ... or the one
column ending in grad_norm; the loss is loss or train/loss; the step is step,
_step, Step or global_step (without one, the rows are numbered from 0).

METHODS, comma-separated:
  zclip                      optax_zclip.zclip() with its defaults
                             (max_grad_norm=1.0 included)
  zclip:z_thresh=3,max_grad_norm=none
                             with arguments (numbers, none, true, false, words)
  clip@1                     optax_zclip.clip_by_global_norm(1.0)
  autoclip, autoclip:percentile=5,window=512
  skip, skip:window=64,sigma=5
                             optax_zclip.skip_spikes(optax.identity()): the
                             norm test, and the loss test with a loss column
  "zclip:z_thresh=2|2.5|3"   a sweep: one method per value (clip@0.5|1|2 too;
                             several swept arguments give every combination);
                             quote it, | is the shell's pipe
  AdaGC is per tensor and a log holds the global norm: it cannot be replayed.

Writes DIR/replay.csv (step, grad_norm, and per method <method>/threshold,
<method>/out_norm, <method>/clipped, and <method>/skipped for skip) and
DIR/replay.png (needs matplotlib), and prints a table per method.

Example:
  python -m optax_zclip.replay run.csv --norm-column train/grad_norm \\
      --loss-column train/loss --step-column _step --methods zclip,clip@1 \\
      --out replay_out""")
  p.add_argument("log", metavar="LOG", help="the log file")
  p.add_argument("--norm-column", metavar="C",
                 help="the column of the global gradient norm, before "
                      "clipping")
  p.add_argument("--loss-column", metavar="C",
                 help="the column of the training loss (for skip's loss "
                      "test, and the plot)")
  p.add_argument("--step-column", metavar="C", help="the column of the step")
  p.add_argument("--where", metavar="COLUMN=VALUE", action="append",
                 default=[],
                 help="keep only the rows whose COLUMN is VALUE (repeatable), "
                      "for a log of several runs")
  p.add_argument("--methods", default=DEFAULT_METHODS, metavar="METHODS",
                 help=f"what to replay (default {DEFAULT_METHODS}); see "
                      "below")
  p.add_argument("--out", default="replay", metavar="DIR",
                 help="where to write replay.csv and replay.png (default "
                      "./replay)")
  p.add_argument("--warmup", type=int, metavar="N",
                 help="the run's warm-up, in steps, which the table counts "
                      "apart (default: the first 10%% of the logged steps)")
  p.add_argument("--no-plot", action="store_true",
                 help="write no plot")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """The command ``python -m optax_zclip.replay``; returns its exit status.

  Bad input (a missing file or column, a value that is not a number, an
  empty series, a bad method spec) is reported on one line of stderr, with
  status 2.
  """
  args = _parser().parse_args(argv)
  try:
    return _main(args)
  except BrokenPipeError:
    # The reader went away (`... | head`): stop quietly, as other commands do.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1
  except (ValueError, OSError) as e:
    msg = str(e) if isinstance(e, ValueError) else (
        f"{e.filename}: {e.strerror}" if e.filename else str(e))
    print(f"{PROG}: error: {' '.join(msg.split())}", file=sys.stderr)
    return 2


def _main(args: argparse.Namespace) -> int:
  if args.warmup is not None and args.warmup < 0:
    raise ValueError(f"--warmup must be >= 0; got {args.warmup}")
  # Check the methods before reading (a typo should not wait for the log).
  _parse_methods(args.methods)
  log = read_log(args.log, args.norm_column, args.loss_column,
                 args.step_column, args.where)
  result = replay(log.norms, log.losses, args.methods, steps=log.steps)

  n = len(log.norms)
  cols = [f"norms from {log.norm_column!r}" if log.norm_column else None,
          f"losses from {log.loss_column!r}" if log.losses else None,
          f"steps from {log.step_column!r}" if log.step_column else
          "no step column: rows numbered from 0"]
  print(_fill(f"Replayed {_count(n, 'step')} ({log.steps[0]} to "
              f"{log.steps[-1]}) of "
              f"{args.log} ({log.fmt}): {', '.join(c for c in cols if c)}."))
  if log.left_out:
    print(_fill(f"Left out {_count(log.left_out, 'row')} without a value in "
                f"{log.norm_column!r} (not a step: the row logged other "
                "values)."))
  for note in log.notes:
    print(_fill(f"Note: {note}."))
  nonfinite = int(np.sum(~np.isfinite(log.norms)))
  if nonfinite:
    print(_fill(f"{_count(nonfinite, 'norm')} "
                f"{'is' if nonfinite == 1 else 'are'} NaN or Inf: non-finite "
                "steps, which the clipping methods pass through untouched and "
                "skip skips."))
  if log.loss_column and not log.losses:
    print(_fill(f"Column {log.loss_column!r} holds no loss on a step with a "
                "norm: skip tests the norms alone."))
  print()
  print(_fill(OPEN_LOOP))
  print()
  first, last = int(log.steps[0]), int(log.steps[-1])
  warmup = (args.warmup if args.warmup is not None
            else max(1, math.ceil(0.1 * (last - first + 1))))
  print(format_table(summary_rows(result, first + warmup)))
  print()
  origin = ("--warmup" if args.warmup is not None
            else "the first 10% of the steps; --warmup to change")
  print(_fill(
      "clipped: steps whose norm the method lowered (count, % of the steps), "
      "skipped ones included; cut: the norm before over the norm after, on "
      "the steps clipped, not skipped; skipped: steps skip_spikes skipped, "
      "NaN and Inf ones included; in "
      "warm-up / later: steps clipped or skipped before step "
      f"{first + warmup} ({origin}) and after."))
  os.makedirs(args.out, exist_ok=True)
  csv_path = os.path.join(args.out, "replay.csv")
  write_csv(csv_path, result)
  wrote = [f"{csv_path} ({n} rows)"]
  if not args.no_plot:
    png = os.path.join(args.out, "replay.png")
    try:
      plot(png, result, log.losses,
           title=f"{os.path.basename(args.log)}: replay (open loop)")
      wrote.append(png)
    except ImportError:
      print("\nNo plot: matplotlib is not installed (pip install matplotlib, "
            "or pip install \"optax-zclip[examples]\").")
  print(f"\nWrote {' and '.join(wrote)}.")
  return 0

