"""Skipping a whole step on an extreme loss or gradient-norm outlier."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_zclip import _numerics, _select, _shared_norms, _validation
from optax_zclip._numerics import F32, AxisName
from optax_zclip._registry import loggable_state


@loggable_state(
    "skip",
    fields=("size", "skipped", "skip_count", "nonfinite_count", "grad_norm",
            "loss_threshold", "norm_threshold"))
class SkipSpikesState(NamedTuple):
  """State of `skip_spikes`: the recent history, telemetry and the inner state.

  `optax_zclip.stats` reports every field but the three buffers and
  ``position``, as ``skip/<field>``, and, with their own keys, the states of
  this package's transforms inside ``inner_state`` (:ref:`telemetry-names`).

  Attributes:
    losses: float32 vector of shape ``[window]``, a ring buffer of the losses
      of the last ``size`` finite steps (0 in a slot whose step had no
      loss).
    has_loss: bool vector of shape ``[window]``, whether each slot of
      ``losses`` holds a loss (a step updated without ``value=`` records its
      norm only).
    norms: float32 vector of shape ``[window]``, a ring buffer of the global
      norms of the same steps' incoming updates.
    size: int32 scalar, how many steps the buffers hold, ``min(finite steps
      so far, window)``.
    position: int32 scalar, the slot the next finite step writes (the oldest
      one once the buffers are full).
    skipped: int32 scalar, 1 if the last step was skipped, else 0.
    skip_count: int32 scalar, cumulative number of skipped steps, non-finite
      ones included.
    nonfinite_count: int32 scalar, cumulative number of steps skipped because
      the loss or the norm was NaN or Inf; they did not enter the buffers.
    grad_norm: float32 scalar, global norm of the last step's incoming
      updates, before the inner transform (NaN or Inf on a non-finite step).
    loss_threshold: float32 scalar, the loss above which the last step was
      skipped, ``mean + sigma * std`` of the losses in the buffer; ``inf``
      when the loss test did not apply (too short a history, or no loss).
    norm_threshold: float32 scalar, the same for the global norm.
    inner_state: the state of the wrapped transformation, exactly as it was
      after the last step that was not skipped (so its telemetry, such as
      ``zclip/grad_norm``, repeats that step's on a skipped one).

  References:
    OLMo-core's ``SkipStepOptimizer``
    (https://github.com/allenai/OLMo-core); see `skip_spikes`.
  """

  losses: jax.Array
  has_loss: jax.Array
  norms: jax.Array
  size: jax.Array
  position: jax.Array
  skipped: jax.Array
  skip_count: jax.Array
  nonfinite_count: jax.Array
  grad_norm: jax.Array
  loss_threshold: jax.Array
  norm_threshold: jax.Array
  inner_state: Any


def _window_stats(values: jax.Array, valid: jax.Array, n: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Mean and sample standard deviation (ddof=1) of ``values[valid]``.

  Two passes over the (small) buffer, the mean first and then the centred
  squares: a one-pass ``E[x^2] - E[x]^2`` cancels to noise in float32 when
  the spread is tiny next to the mean, as it is for a loss near 2.5. The
  deviations are divided by the largest one before squaring, so that a huge
  finite value in the window (a 1e30 loss) does not overflow the sum. With
  ``n < 2`` the standard deviation is not used and is returned as 0.
  """
  count = jnp.maximum(n, 1).astype(F32)
  mean = jnp.sum(jnp.where(valid, values / count, 0.0))
  dev = jnp.where(valid, values - mean, 0.0)
  peak = jnp.max(jnp.abs(dev))
  unit = jnp.where(peak > 0, peak, 1.0)
  dof = jnp.maximum(n - 1, 1).astype(F32)
  std = peak * jnp.sqrt(jnp.sum(jnp.square(dev / unit)) / dof)
  return mean, std


def _test(x, values, valid, n, min_history, sigma):
  """``(outlier, threshold)`` of the one-sided test of ``x`` on a window.

  The test applies once the history holds ``n`` values with ``n + 1 >=
  min_history`` and ``n >= 2`` (one value has no sample standard
  deviation); otherwise ``x`` is no outlier and the threshold is ``inf``.
  """
  mean, std = _window_stats(values, valid, n)
  active = (n + 1 >= min_history) & (n >= 2)
  outlier = active & (x - mean > sigma * std)
  return outlier, jnp.where(active, mean + sigma * std, jnp.inf)


class SkipSpikesFallbackWarning(UserWarning):
  """`skip_spikes` selected its inner update's whole new state after the fact.

  Emitted once each time an update is traced (under `jax.jit`, once per
  compilation) when ``zero_copy`` is True but the zero-copy select cannot
  run on the installed JAX (the message names the cause). The step then
  selects ``where(keep, new, old)`` over the inner update's outputs: the
  same decisions, updates and states, bit for bit, at the cost of a copy of
  the optimizer state in memory and more memory traffic
  (:ref:`skip-fallback`; the Performance guide measures it,
  :ref:`performance-memory`).

  Example:
    A run that must not pay the copy can make the warning an error, so that
    it stops at the first compilation:

    >>> import warnings
    >>> import optax_zclip
    >>> with warnings.catch_warnings():
    ...   warnings.filterwarnings(
    ...       "error", category=optax_zclip.SkipSpikesFallbackWarning)

  References:
    OLMo-core's ``SkipStepOptimizer``
    (https://github.com/allenai/OLMo-core), whose rule `skip_spikes`
    follows.
  """


class SkipSpikesNoLossWarning(UserWarning):
  """`skip_spikes` was updated without ``value=``: its loss test is off.

  Emitted once each time an update is traced (under `jax.jit`, once per
  compilation) when ``tx.update(grads, state, params)`` gets no ``value``,
  as from a training loop that knows nothing of the loss (Flax's
  ``TrainState.apply_gradients``). The step then tests the gradient norm
  alone. Pass the loss, ``tx.update(grads, state, params, value=loss)``, or
  say that the norm test alone is meant, with ``value=None`` or
  ``skip_spikes(inner, loss_test=False)``: either silences it
  (:ref:`skip-passing-loss`).

  Example:
    >>> import warnings
    >>> import jax.numpy as jnp
    >>> import optax, optax_zclip
    >>> tx = optax_zclip.skip_spikes(optax.sgd(1.0))
    >>> state = tx.init(jnp.zeros(1))
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   _ = tx.update(jnp.ones(1), state)  # warns
    ...   _ = tx.update(jnp.ones(1), state, value=None)  # silent
    >>> [w.category.__name__ for w in caught]
    ['SkipSpikesNoLossWarning']

  References:
    :doc:`The Integrations guide's Flax recipes </guides/integrations>`.
  """


_NO_LOSS = (
    "skip_spikes: update() was called without `value=`, so only the "
    "gradient norm is tested and a loss spike with an ordinary norm is "
    "taken. Pass the step's loss: tx.update(grads, state, params, "
    "value=loss) ({nnx}; for flax's TrainState, the Integrations guide's "
    "apply_gradients). To test the norm alone, say so: value=None, or "
    "skip_spikes(inner, loss_test=False) where the loop passes no "
    "arguments.")

# Where `init_around` finds how a `skip_spikes` transform builds its state
# around a given inner state: an attribute of its `init`, so that it reads
# the transform's own window rather than one given again.
_AROUND = "_optax_zclip_around"


def init_around(tx: optax.GradientTransformation,
                inner_state: Any) -> SkipSpikesState:
  """The state of a `skip_spikes` transform around an inner state it is given.

  Adds `skip_spikes` to a run resumed from a checkpoint taken without it:
  restore the inner optimizer's state as usual, then wrap it. The result is
  what ``tx.init(params)`` builds (an empty history of ``tx``'s own
  ``window``, zero counters) but for ``inner_state``, used as it is, so the
  run continues from it; the skip rule starts afresh, as at the start of a
  run (:ref:`skip-resumed-run`).

  Args:
    tx: the transform built by `skip_spikes`, as it is (not inside another
      wrapper).
    inner_state: the state of the optimizer ``tx`` wraps, as its ``init``
      or ``update`` returns it.

  Returns:
    A `SkipSpikesState`.

  Raises:
    TypeError: if ``tx`` was not built by `skip_spikes`, or
      ``inner_state`` is already a `SkipSpikesState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax, optax_zclip
    >>> inner = optax.sgd(1.0)
    >>> params = jnp.zeros(2)
    >>> inner_state = inner.init(params)  # as restored
    >>> tx = optax_zclip.skip_spikes(inner, window=4)
    >>> state = optax_zclip.init_around(tx, inner_state)
    >>> state.losses.shape, int(state.size)
    ((4,), 0)

  References:
    OLMo-core's ``SkipStepOptimizer`` (https://github.com/allenai/OLMo-core),
    whose rule `skip_spikes` follows.
  """
  around = getattr(getattr(tx, "init", None), _AROUND, None)
  if around is None:
    raise TypeError(
        "init_around: `tx` must be the transform skip_spikes() returned, "
        f"as it is; got {tx!r}.")
  if isinstance(inner_state, SkipSpikesState):
    raise TypeError(
        "init_around: `inner_state` is already a SkipSpikesState; pass the "
        "state of the optimizer skip_spikes wraps (its inner_state).")
  return around(inner_state)


def _select_as_computed_or_after(update: _select.Update, keep: jax.Array,
                                 updates: Any, state: Any
                                 ) -> tuple[Any, Any]:
  """`_select.select_as_computed`, or `_select.select_after` with a
  `SkipSpikesFallbackWarning` naming the cause where it cannot run."""
  try:
    return _select.select_as_computed(update, keep, updates, state)
  except _select.SelectUnsupported as e:
    cause = str(e)
  warnings.warn(
      "skip_spikes: the zero-copy select of the inner update cannot run on "
      f"jax {jax.__version__} ({cause}); each step selects the inner "
      "update's whole new state after it instead. The decisions, updates "
      "and states are the same, but XLA keeps a copy of the old optimizer "
      "state (for AdamW about twice the parameters' bytes of memory; the "
      "Performance guide has the figures). Please report it with your jax "
      "version; skip_spikes(..., zero_copy=False) makes this choice "
      "without the warning.",
      SkipSpikesFallbackWarning, stacklevel=3)
  return _select.select_after(update, keep, updates, state)


_NNX_CALL = "with nnx.Optimizer, optimizer.update(model, grads, value=loss)"


def _check_loss_arguments(args: tuple, extra_args: dict) -> None:
  """Refuses a loss `skip_spikes` would not see: given by position, or by a
  name other than ``value`` (``loss=``, as MaxText and Levanter name it)."""
  if args:
    raise TypeError(
        f"skip_spikes: update() got {len(args)} positional "
        f"argument{'s' if len(args) > 1 else ''} after `params`; it takes "
        "the step's loss by keyword: "
        f"tx.update(grads, state, params, value=loss) ({_NNX_CALL}).")
  if "value" in extra_args:
    return
  named = [k for k in extra_args if "loss" in k.lower()]
  if named:
    raise TypeError(
        f"skip_spikes: update() got {', '.join(f'`{k}=`' for k in named)} "
        "but no `value=`, so its loss test would not run: it reads the "
        "step's loss from `value`, optax's name for it. Pass value=loss "
        f"({_NNX_CALL}); to hand `{named[0]}` to another transform and test "
        "the norm alone, pass value=None as well.")


@_validation.keyword_only
def skip_spikes(
    inner: optax.GradientTransformation,
    *,
    window: int = 128,
    sigma: jax.typing.ArrayLike = 6.0,
    axis_name: AxisName = None,
    loss_test: bool = True,
    zero_copy: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Skips a whole step when its loss or gradient norm is an extreme outlier.

  Wraps an optimizer, typically ``optax.chain(optax_zclip.zclip(),
  optax.adamw(lr))``, and keeps the losses ``L`` and global gradient norms
  ``G`` (before any clipping) of the last ``window`` finite steps. From the
  ``max(3, window // 2)``-th finite step on, a step with loss ``x`` and norm
  ``g`` is skipped when

  .. math::
    x - \operatorname{mean}(L) > \sigma \operatorname{std}(L)
    \quad\text{or}\quad
    g - \operatorname{mean}(G) > \sigma \operatorname{std}(G),

  with the sample standard deviation; a NaN or Inf loss or norm is always
  skipped and never recorded. A skipped step returns zero updates and leaves
  the inner state bit-identical; a taken step is exactly the inner
  optimizer's. Pass the loss by keyword, ``tx.update(grads, state, params,
  value=loss)``: without it only the norm is tested
  (:ref:`skip-passing-loss`). The full rule is in :ref:`the Skipping guide
  <skip-rule>`, what skipping costs in :ref:`its Composition section
  <skip-composition>`.

  Args:
    inner: the optimizer whose steps are taken or skipped, an
      `optax.GradientTransformation`.
    window: how many recent finite steps the statistics cover; a Python int
      >= 2 (it sets the state's shape: under `optax.inject_hyperparams`,
      list it in ``static_args``).
    sigma: how many standard deviations above the window's mean a loss or
      norm must be to skip the step; > 0.
    axis_name: a mesh axis name (or tuple of names) over which the squared
      norm is ``psum``-ed, inside `jax.shard_map` or `jax.pmap` when each
      device holds a slice of every gradient (pass the global, ``pmean``-ed
      loss). Leave None on one device, for replicated gradients and under
      sharded `jax.jit` (:doc:`/guides/distributed`).
    loss_test: False tests the gradient norm alone, for a training loop that
      passes no loss (a ``value`` given is passed on to ``inner``
      untested); True (the default) tests the loss given as ``value=`` too,
      and warns when an update has none.
    zero_copy: True (the default) selects each new value of the inner state
      as it is computed, which costs no copy of the optimizer state (where
      the installed JAX cannot run that, it falls back to the select of
      False, with a `SkipSpikesFallbackWarning`). False selects the inner
      update's whole new state after the fact, which costs a copy of the
      optimizer state (:ref:`skip-fallback`).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `SkipSpikesState`.

  Raises:
    ValueError: if an argument is out of its range (the message names it);
      when the update is traced, if ``value`` is not a scalar or the state's
      history is not ``window`` long.
    TypeError: when the update is traced, if the loss is given by position
      or under another name than ``value``, or the state is not a
      `SkipSpikesState` (for a resumed run, see `init_around`).

  Warns:
    SkipSpikesNoLossWarning: when the update is traced without ``value``
      and ``loss_test`` is True.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax, optax_zclip
    >>> tx = optax_zclip.skip_spikes(optax.sgd(1.0), window=4, sigma=3.0)
    >>> state = tx.init(jnp.zeros(1))
    >>> for g, loss in [(1.0, 3.0), (1.1, 2.9), (0.9, 2.8), (1.0, 9.0)]:
    ...   out, state = tx.update(jnp.array([g]), state, value=loss)
    >>> print(out, int(state.skipped), f"{state.loss_threshold:.3f}")
    [0.] 1 3.200
    >>> out, state = tx.update(jnp.array([1.0]), state, value=2.7)
    >>> print(out, int(state.skip_count))
    [-1.] 1

  References:
    The rule of OLMo-core's ``SkipStepOptimizer``,
    `allenai/OLMo-core <https://github.com/allenai/OLMo-core/blob/fa6c5014c9f6e9ee789da2d9c20d5126fee8df0d/src/olmo_core/optim/skip_step_optimizer.py>`_;
    the same rule as optax wrappers in MaxText (``skip_step_on_spikes``) and
    Levanter (``SkipStepConfig``): :ref:`skip-others`.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise ValueError(
        "`inner` must be an optax.GradientTransformation (for "
        "optax.MultiSteps, wrap skip_spikes in it instead); got "
        f"{inner!r}.")
  _validation.check_int("window", window, 2, static=True)
  _validation.check_number("sigma", sigma, lambda v: v > 0, "finite and > 0",
                           float32=True)
  _validation.check_bool("loss_test", loss_test)
  _validation.check_bool("zero_copy", zero_copy)
  window = int(window)
  min_history = max(2, window // 2)
  if zero_copy:
    _select_inner = _select_as_computed_or_after
  else:
    _select_inner = _select.select_after
  inner = optax.with_extra_args_support(inner)

  def around(inner_state):
    i32, scalar = jnp.int32, _numerics.scalar
    return SkipSpikesState(
        losses=jnp.zeros([window], F32),
        has_loss=jnp.zeros([window], jnp.bool_),
        norms=jnp.zeros([window], F32),
        size=scalar(0, i32), position=scalar(0, i32),
        skipped=scalar(0, i32), skip_count=scalar(0, i32),
        nonfinite_count=scalar(0, i32), grad_norm=scalar(0.0),
        loss_threshold=scalar(jnp.inf), norm_threshold=scalar(jnp.inf),
        inner_state=inner_state)

  def init_fn(params):
    return around(inner.init(params))

  # `init_around(tx, inner_state)` builds the same state as `init`.
  setattr(init_fn, _AROUND, around)

  def update_fn(updates, state, params=None, *args, **extra_args):
    _check_loss_arguments(args, extra_args)
    _validation.check_state(
        "skip_spikes", state, SkipSpikesState,
        hint="If it is the state of the optimizer skip_spikes wraps (a run "
        "resumed from a checkpoint taken without skip_spikes), build this "
        "one's around it: optax_zclip.init_around(tx, inner_state).")
    held_steps = getattr(state.losses, "shape", None)
    if held_steps != (window,):
      raise ValueError(
          f"skip_spikes: the state's history has shape {held_steps}, but "
          f"this transform's window is {window}: it is the state of another "
          "skip_spikes. Build it with this transform's init() or "
          "optax_zclip.init_around(tx, inner_state).")
    if "value" not in extra_args and loss_test:
      # At trace time, so once per compilation under jit, never per step.
      warnings.warn(_NO_LOSS.format(nnx=_NNX_CALL), SkipSpikesNoLossWarning,
                    stacklevel=2)
    loss = extra_args.get("value")
    given = loss_test and loss is not None
    if given:
      loss = _numerics.as_f32(loss)
      if loss.ndim:
        raise ValueError("`value` must be a scalar (the step's loss); got "
                         f"shape {loss.shape}.")
    else:
      loss = jnp.zeros([], F32)  # recorded with has_loss False, never read

    sig = _numerics.as_f32(sigma)
    leaf_norms = _numerics.leaf_norm_list(updates, axis_name)
    g_norm = _numerics.norm_of_norms(_numerics.stack_norms(leaf_norms))
    held = jnp.arange(window) < state.size
    norm_spike, norm_threshold = _test(g_norm, state.norms, held, state.size,
                                       min_history, sig)
    with_loss = held & state.has_loss
    loss_spike, loss_threshold = _test(
        loss, state.losses, with_loss, jnp.sum(with_loss, dtype=jnp.int32),
        min_history, sig)
    if not given:
      loss_spike = jnp.zeros([], jnp.bool_)
      loss_threshold = jnp.full([], jnp.inf, F32)
    finite = jnp.isfinite(g_norm) & jnp.isfinite(loss)
    skip = ~finite | loss_spike | norm_spike

    # A finite step is recorded whether it is skipped or not, so that a
    # lasting shift of the loss or norm becomes the new normal within
    # `window` steps instead of skipping forever; a non-finite one never is.
    pos = state.position
    losses = _numerics.write_slot(state.losses, pos, loss, finite)
    has_loss = _numerics.write_slot(state.has_loss, pos, given, finite)
    norms = _numerics.write_slot(state.norms, pos, g_norm, finite)
    size = jnp.where(finite, jnp.minimum(state.size + 1, window), state.size)
    position = jnp.where(finite, (pos + 1) % window, pos)

    # A kept step is the inner update, bit for bit; a skipped one returns
    # zeros and the inner state as it was (`_select`). A ZClip, AdaGC,
    # AutoClip or clip_by_global_norm at the head of `inner` (same updates,
    # same axis_name) takes these norms rather than tracing its own
    # overflow-safe pass (`_shared_norms`).
    with _shared_norms.offered(updates, axis_name, leaf_norms):
      inner_updates, inner_state = _select_inner(
          lambda u, s: inner.update(u, s, params, **extra_args), ~skip,
          updates, state.inner_state)

    new_state = SkipSpikesState(
        losses=losses, has_loss=has_loss, norms=norms,
        size=size.astype(jnp.int32), position=position.astype(jnp.int32),
        skipped=skip.astype(jnp.int32),
        skip_count=_numerics.increment_where(skip, state.skip_count),
        nonfinite_count=_numerics.increment_where(~finite,
                                                  state.nonfinite_count),
        grad_norm=g_norm, loss_threshold=loss_threshold.astype(F32),
        norm_threshold=norm_threshold.astype(F32), inner_state=inner_state)
    return inner_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
