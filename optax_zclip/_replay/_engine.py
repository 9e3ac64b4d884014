"""The replay: each method fed the logged norms, one vmapped scan a group."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_zclip._numerics import F32
from optax_zclip._replay._methods import (
  _ADAGC,
  _FACTORIES,
  _INTS,
  _TRACED,
  DEFAULT_METHODS,
  _arguments,
  _parse_methods,
  _Spec,
)
from optax_zclip._stats import stats

# The clipping states whose clips a fixed cap can make: ZClip's
# `max_grad_norm`, and the fixed threshold itself.
_CAPPED = ("zclip", "clip")


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
  # Which clips a cap made: ZClip says so itself; the fixed threshold is a
  # cap and nothing else. (Inside skip_spikes, the inner telemetry of a
  # skipped step is the last taken step's.)
  if clipper == "zclip":
    capped = s["zclip/capped"] > 0
  elif clipper == "clip":
    capped = out < g
  else:
    capped = jnp.zeros([], bool)
  capped = capped & ~skipped
  out = jnp.where(skipped, jnp.zeros([], F32), out)
  # A skipped step counts as clipped (to zero), a NaN or Inf one included,
  # whose `out < g` is False.
  return {"threshold": threshold.astype(F32), "out_norm": out.astype(F32),
          "clipped": skipped | (out < g), "skipped": skipped,
          "capped": capped}


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
      # value=None: a step without a loss, whose norm alone skip_spikes
      # tests (said, so that it does not warn of a forgotten loss).
      if with_loss == "some":
        _, state = jax.lax.cond(
            given, lambda s: tx.update(u, s, params, value=loss),
            lambda s: tx.update(u, s, params, value=None), state)
      elif with_loss == "all":
        _, state = tx.update(u, state, params, value=loss)
      else:
        _, state = tx.update(u, state, params, value=None)
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
  own transform from this package (for `skip_spikes`, with the logged loss
  as ``value=``), under one compiled `jax.lax.scan`, and reads from its
  telemetry what it did. For a run that used ZClip, replaying its pre-clip
  norms with its settings gives back its thresholds and decisions exactly.
  A replay is open loop: every method sees the norms the logged run
  produced, so it tells which steps a rule would have clipped, and how
  hard, not what the loss would have been (:ref:`replay-python`; the
  command ``optax-zclip replay LOG`` does the same on a log file, and
  :ref:`replay-cost` says what a replay costs).

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

  `adagc`, which needs each tensor's norm, is refused.

  Args:
    norms: the logged global gradient norms (before clipping), one per step,
      in order: a one-dimensional sequence of numbers >= 0, NaN or Inf
      (taken in float32; a NaN or Inf is a non-finite step, which each
      method treats as its transform does).
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
    or Inf one included), for a method that skips, ``"m/skipped"`` (bool)
    and, after the columns of every method, for each method with a fixed
    cap (`zclip`, `clip_by_global_norm`), ``"m/capped"`` (bool: the cap made
    the clip, ``zclip/capped``; every clip of the fixed threshold; never a
    skipped step). When `skip_spikes`
    wraps a clipping transform, the threshold is the clipping transform's
    (on a skipped step, that of the last step taken).

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
    ``SkipStepOptimizer`` (https://github.com/allenai/OLMo-core; see
    `skip_spikes`).
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
                       has_skip, clipper in _CAPPED)
  for name, _ in items:
    out, has_skip, _ = outputs[name]
    for field in ("threshold", "out_norm", "clipped"):
      result[f"{name}/{field}"] = out[field]
    if has_skip:
      result[f"{name}/skipped"] = out["skipped"]
  # Last, after the columns of every method, so that a reader of the CSV by
  # position from before these columns reads the same.
  for name, _ in items:
    out, _, has_cap = outputs[name]
    if has_cap:
      result[f"{name}/capped"] = out["capped"]
  return result
