"""Skipping a whole step on an extreme loss or gradient-norm outlier."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_zclip import _compat, _numerics, _validation
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
  this package's transforms inside ``inner_state``.

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
  compilation) when the zero-copy replay of the inner update could not run
  on the installed JAX: a construct of its jaxpr or an internal API the
  replay does not know (the message names it). The step is then computed as
  ``where(keep, new, old)`` over the inner update's outputs: the same
  decisions, updates and states, bit for bit, but XLA keeps a copy of the
  old optimizer state: for AdamW, +1.94x the parameters' bytes of peak
  memory and +5.0x of memory traffic (``benchmarks/memory.py``).
  Silence it with ``warnings.filterwarnings("ignore",
  category=optax_zclip.SkipSpikesFallbackWarning)`` once the cost is known.

  References:
    The Skipping guide's section on the fallback, and the Performance
    guide's memory table.
  """


class SkipSpikesNoLossWarning(UserWarning):
  """`skip_spikes` was updated without ``value=``: its loss test is off.

  Emitted once each time an update is traced (under `jax.jit`, once per
  compilation; never from inside the compiled step) when
  ``tx.update(grads, state, params)`` is called with no ``value``, as a
  training loop that knows nothing of the loss does (Flax's
  ``TrainState.apply_gradients``, a plain ``optimizer.update(model,
  grads)``). The step then tests the gradient norm alone, and a loss spike
  with an ordinary norm is taken. Pass the loss,
  ``tx.update(grads, state, params, value=loss)``
  (``optimizer.update(model, grads, value=loss)`` with ``nnx.Optimizer``),
  or say that the norm test alone is meant: ``value=None`` in the call, or
  ``skip_spikes(inner, loss_test=False)`` where the loop cannot pass
  arguments. Either silences it.

  References:
    The Skipping guide's section on passing the loss, and the Integrations
    guide's Flax recipes.
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

  To add `skip_spikes` to a run resumed from a checkpoint taken without it:
  restore the inner optimizer's state as usual (into a target from
  ``inner.init``), then wrap it. The result is exactly what
  ``tx.init(params)`` builds (an empty history of ``tx``'s own ``window``,
  zero counters) but for ``inner_state``, which is used as it is, with no
  copy, so the run continues from it::

    inner = optax.chain(optax_zclip.zclip(), optax.adamw(lr))
    restored = ckptr.restore(path, target)     # saved without skip_spikes
    tx = optax_zclip.skip_spikes(inner, window=128)
    opt_state = optax_zclip.init_around(tx, restored["opt_state"])

  The skip rule starts with an empty history, as at the start of a run: it
  skips nothing until it holds ``max(3, window // 2)`` steps.

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
    >>> inner_state = inner.init(params)        # restored from a checkpoint
    >>> tx = optax_zclip.skip_spikes(inner, window=4)
    >>> state = optax_zclip.init_around(tx, inner_state)
    >>> state.losses.shape, int(state.size)
    ((4,), 0)
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


def _gated_update(update: Any, keep: jax.Array, updates: Any,
                  state: Any) -> tuple[Any, Any]:
  """``update(updates, state)`` where ``keep``; else zeros and ``state``.

  The obvious ``where(keep, new, old)`` on the outputs costs a copy of every
  optimizer moment: AdamW's parameter step recomputes the new moments from
  the old ones in its own fused loop, while another loop overwrites those
  old moments in place with the selected ones, so XLA must copy the old
  moments first (+2x the params' bytes of memory for AdamW), and a
  `jax.lax.cond` instead materialises the updates, which then cannot fuse
  into `optax.apply_updates` (+1x memory, +3x traffic).

  Here the update is traced once into a jaxpr and replayed into the current
  trace (`_compat.replay_jaxpr`), and each new state value is replaced by
  its ``where(keep, new, old)`` the moment it is computed, so that
  everything computed from it, the updates included, reads the selected
  value. XLA then sees the unwrapped update's dataflow (the step reads the
  moments it has just written in place) with one select folded into each
  loop: no copy and no extra pass. Where ``keep`` holds, ``where`` returns
  ``new`` bit for bit, so a kept step is exactly ``update``'s; where it
  does not, the updates computed from the old state are replaced by zeros,
  and every state leaf is the old one (a state leaf that could not be
  substituted, a constant or a value shared by two leaves, is selected at
  the end).

  If the replay cannot run (`_compat.ReplayUnsupported`: a jaxpr construct
  or JAX API it does not know), the select is made on the outputs instead,
  the same values at the cost of the copy, with a
  `SkipSpikesFallbackWarning` naming the cause.
  """
  flat_in, in_tree = jax.tree.flatten((updates, state))
  n_in = len(jax.tree.leaves(updates))
  old = flat_in[n_in:]

  def flat_update(*flat):
    # The norms known for the updates (`skip_spikes` measured them) are
    # those of the arrays that stand for them in this trace too.
    with _numerics.known_norms_carried(flat_in[:n_in], flat[:n_in]):
      return update(*jax.tree.unflatten(in_tree, flat))

  closed, out_shape = jax.make_jaxpr(flat_update, return_shape=True)(*flat_in)
  n_updates = len(jax.tree.leaves(out_shape[0]))
  updates_tree = jax.tree.structure(out_shape[0])
  state_tree = jax.tree.structure(out_shape[1])
  try:
    return _replayed(closed, flat_in, keep, old, n_updates, updates_tree,
                     state_tree)
  except _compat.ReplayUnsupported as e:
    cause = str(e)
  warnings.warn(
      "skip_spikes: the zero-copy replay of the inner update cannot run on "
      f"jax {jax.__version__} ({cause}); each step selects the inner "
      "update's whole new state instead. The decisions, updates and states "
      "are the same, but XLA keeps a copy of the old optimizer state: for "
      "AdamW about +2x the parameters' bytes of memory and +5x of memory "
      "traffic. Please report it with your jax version.",
      SkipSpikesFallbackWarning, stacklevel=3)
  new_updates, new_state = update(updates, state)
  return (jax.tree.map(lambda u: jnp.where(keep, u, jnp.zeros([], u.dtype)),
                       new_updates),
          jax.tree.map(lambda n, o: jnp.where(keep, n, o), new_state, state))


def _replayed(closed, flat_in, keep, old, n_updates, updates_tree,
              state_tree):
  """`_gated_update`'s result by replaying ``closed`` (see there)."""
  jaxpr = closed.jaxpr
  state_vars = jaxpr.outvars[n_updates:]
  uses: dict[Any, int] = {}
  for v in state_vars:
    if not _compat.is_literal(v):
      uses[v] = uses.get(v, 0) + 1
  inputs = set(jaxpr.invars)
  select = {v: o for v, o in zip(state_vars, old, strict=True)
            if not _compat.is_literal(v) and v not in inputs
            and uses[v] == 1}

  def substitute(v, x):
    return jnp.where(keep, x, select[v]) if v in select else x

  outs = _compat.replay_jaxpr(closed, flat_in, substitute)
  new_updates = [jnp.where(keep, u, jnp.zeros([], u.dtype))
                 for u in outs[:n_updates]]
  new_state = [
      x if not _compat.is_literal(v) and v in select
      else jnp.where(keep, x, o)
      for v, x, o in zip(state_vars, outs[n_updates:], old, strict=True)]
  return (jax.tree.unflatten(updates_tree, new_updates),
          jax.tree.unflatten(state_tree, new_state))


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
) -> optax.GradientTransformationExtraArgs:
  r"""Skips a whole step when its loss or gradient norm is an extreme outlier.

  Wraps an optimizer, typically ``optax.chain(optax_zclip.zclip(),
  optax.adamw(lr))``, and keeps the losses ``L`` and global gradient norms
  ``G`` of the last ``window`` finite steps. Each step, with ``x`` its loss
  (passed as ``tx.update(grads, state, params, value=loss)``, the name
  optax gives a loss) and ``g`` the float32 global norm of the incoming
  updates, before any clipping:

  * if ``x`` or ``g`` is NaN or Inf, the step is skipped and nothing is
    recorded;
  * else, while the history holds ``n`` steps with ``n + 1 < max(2, window
    // 2)``, the step is taken;
  * else the step is skipped when

    .. math::
      x - \operatorname{mean}(L) > \sigma \operatorname{std}(L)
      \quad\text{or}\quad
      g - \operatorname{mean}(G) > \sigma \operatorname{std}(G),

    with the sample standard deviation (ddof=1); only an increase counts.
    A standard deviation needs two recorded values, so with ``window < 6``
    the test starts at the third step (``n >= 2``), not the second;
  * then the pair ``(x, g)`` is recorded, skipped or not, replacing the
    oldest once ``window`` are held.

  A skipped step returns zero updates and leaves the inner state (AdamW's
  moments and count, ZClip's statistics) bit-identical; a taken step is
  exactly the inner transformation's. So on a skipped step the telemetry of
  the inner transforms (``zclip/grad_norm``, ``zclip/threshold``, ...)
  repeats the last taken step's: log ``skip/grad_norm`` for the norm of
  every step, and ``skip/skipped`` to tell the two apart. This is
  OLMo-core's rule for skipping steps, with a NaN never entering the history
  (where it would skip every step until it aged out) and the norm always
  taken before clipping.

  The loss must be passed by that keyword: an update given it by position,
  or under another name that holds ``loss`` (``loss=``, ``train_loss=``)
  without ``value``, raises a `TypeError` rather than silently testing the
  norm alone. An update without ``value`` at all tests the norm alone and
  warns (a `SkipSpikesNoLossWarning`, once per trace); ask for the norm
  test alone with ``value=None`` (which also lets a ``loss=`` meant for
  another transform through) or ``loss_test=False``, and it does so
  silently. The step's norm is still recorded, and the loss test of later
  steps uses the losses that were given (it needs as many of them as the
  norm test needs norms). All extra arguments, ``value`` included, are
  passed on to ``inner`` (optax's `optax.contrib.reduce_on_plateau` reads
  the same ``value``).

  A run resumed from a checkpoint taken without ``skip_spikes`` gets its
  state from `init_around`, around the restored state of ``inner``; an
  update given any state but a `SkipSpikesState` raises a `TypeError` that
  says so.

  Skipping costs no memory and no pass over the parameters: the inner
  update runs on every step, but each new value of its state is selected
  (old or new) as soon as it is computed, so that XLA updates AdamW's
  moments in place and fuses the selects into the loops of the unwrapped
  step. On a donated train step, ``skip_spikes(optax.chain(zclip(),
  optax.adamw(lr)))`` has the same peak memory and the same bytes accessed
  as the chain alone (the Performance guide has the numbers, and how they
  are measured). A `zclip`, `adagc`, `autoclip` or `clip_by_global_norm` at
  the head of ``inner`` (with the same ``axis_name``) takes the per-leaf
  norms ``skip_spikes`` measured rather than measuring them again, so the
  step reads the gradients and compiles the norms once.

  The selecting-as-computed replays the inner update's jaxpr, an internal
  format of JAX. Where the replay cannot handle it (a construct it does not
  know, or an API moved in a JAX release newer than this package), the
  whole new state is selected after the update instead: the same values,
  bit for bit, at the cost of a copy of the optimizer state (for AdamW +2x
  the parameters' bytes of memory), announced once per trace by a
  `SkipSpikesFallbackWarning` that names the cause.

  Args:
    inner: the optimizer whose steps are taken or skipped, an
      `optax.GradientTransformation`.
    window: how many recent finite steps the statistics cover; a Python int
      >= 2 (it sets the state's shape, so under `optax.inject_hyperparams`
      list it in ``static_args``). The test applies from the
      ``max(3, window // 2)``-th finite step on.
    sigma: how many standard deviations above the window's mean a loss or
      norm must be to skip the step; > 0.
    axis_name: a mesh axis name (or tuple of names) over which the squared
      norm is ``psum``-ed, inside `jax.shard_map` or `jax.pmap` when each
      device holds a slice of the gradients (the loss must then be the
      global one, ``pmean``-ed, so that every device decides alike). Leave
      None on one device, for replicated gradients and under sharded
      `jax.jit`.
    loss_test: False tests the gradient norm alone, for a training loop
      that passes no loss (``value=`` is then passed on to ``inner``
      untested); True (the default) tests the loss given as ``value=`` too,
      and warns when an update has no ``value``.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `SkipSpikesState`.

  Raises:
    ValueError: if ``inner`` is not an `optax.GradientTransformation`,
      ``window`` not an integer >= 2, ``sigma`` not a number > 0 or
      ``loss_test`` not a bool (the message names the argument); when the
      update is traced, if ``value`` is not a scalar, or the state's
      history is not ``window`` long (another ``skip_spikes``' state).
    TypeError: when the update is traced, if it is given a positional
      argument after ``params``, a keyword holding ``loss`` but no
      ``value`` (the message says how to pass the loss), or a state that
      is not a `SkipSpikesState` (the message points to `init_around`).

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
    The rule of OLMo-core's ``SkipStepOptimizer``:
    https://github.com/allenai/OLMo-core/blob/fa6c5014c9f6e9ee789da2d9c20d5126fee8df0d/src/olmo_core/optim/skip_step_optimizer.py.
    The same rule as optax wrappers: MaxText's ``skip_step_on_spikes``,
    https://github.com/AI-Hypercomputer/maxtext/blob/e591f30cbbf217ed67ef71263ec0538239f9c3b8/src/maxtext/optimizers/optimizers.py,
    and Levanter's ``SkipStepConfig``,
    https://github.com/marin-community/levanter/blob/9263f81e8b453241332c2c0b2d2001bfb2d2241c/src/levanter/optim/skipstep.py.
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
  window = int(window)
  min_history = max(2, window // 2)
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
    # zeros (a `where`, not a multiply by 0, so that a NaN update cannot leak
    # through) and the inner state as it was. See `_gated_update` for why
    # this costs no copy.
    # A ZClip, AdaGC, AutoClip or clip_by_global_norm at the head of
    # `inner` (same updates, same axis_name) reuses these norms rather than
    # tracing its own overflow-safe pass.
    with _numerics.known_norms(updates, axis_name, leaf_norms):
      inner_updates, inner_state = _gated_update(
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
