"""AdaGC: per-tensor adaptive clipping against an EMA of clipped norms."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_zclip import _numerics, _shared_norms, _validation
from optax_zclip._numerics import F32, AxisName
from optax_zclip._registry import loggable_state


@loggable_state(
    "adagc",
    fields=("count", "grad_norm", "clipped_norm", "num_clipped",
            "nonfinite_count", "capped", "cap_count"))
class AdaGCState(NamedTuple):
  """State of `adagc`: one reference norm per tensor, plus telemetry.

  `optax_zclip.stats` reports every field but ``gamma``, as
  ``adagc/<field>`` (:ref:`telemetry-names`).

  Attributes:
    count: int32 scalar, number of steps whose global norm was finite (as
      for `zclip` and `autoclip`). Warm-up lasts while ``count <
      warmup_steps``, so a NaN or Inf step does not use up a warm-up step;
      such steps are counted in ``nonfinite_count`` instead.
    gamma: a pytree with the structure of the updates whose leaves are
      float32 scalars: each tensor's reference norm (the running minimum of
      its clipped norm during warm-up, then an EMA of it). ``inf`` until the
      tensor has had a finite, non-zero norm on a finite step.
    grad_norm: float32 scalar, global L2 norm of the last step's incoming
      updates (NaN or Inf if that step was non-finite).
    clipped_norm: float32 scalar, global norm of the last step's outgoing
      updates.
    num_clipped: int32 scalar, number of tensors scaled down in the last
      step.
    nonfinite_count: int32 scalar, cumulative number of steps whose global
      norm was NaN or Inf; they leave ``count`` and ``gamma`` untouched.
    capped: int32 scalar, 1 if the cap ``max_grad_norm`` clipped the last
      step, else 0. The cap acts in warm-up only (a global-norm clip of the
      whole update), so ``capped`` is 1 on a warm-up step whose finite
      global norm is above the cap, and 0 afterwards, when every clip is
      the per-tensor rule's (``num_clipped``). Always 0 when
      ``max_grad_norm`` is None.
    cap_count: int32 scalar, cumulative number of steps the cap clipped.

  References:
    Wang et al., `AdaGC: Improving Training Stability for Large Language
    Model Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025.
  """

  count: jax.Array
  gamma: Any
  grad_norm: jax.Array
  clipped_norm: jax.Array
  num_clipped: jax.Array
  nonfinite_count: jax.Array
  capped: jax.Array
  cap_count: jax.Array


@_validation.keyword_only
def adagc(
    *,
    lambda_rel: jax.typing.ArrayLike = 1.04,
    beta: jax.typing.ArrayLike = 0.99,
    warmup_steps: jax.typing.ArrayLike = 100,
    max_grad_norm: jax.typing.ArrayLike | None = 1.0,
    eps: jax.typing.ArrayLike = 1e-6,
    axis_name: AxisName = None,
) -> optax.GradientTransformation:
  r"""Clips each tensor against its own EMA of past clipped norms (AdaGC).

  Where `zclip` watches one global norm, AdaGC keeps a reference norm
  ``gamma_i`` per tensor (leaf) and clips each tensor separately, so a spike
  confined to one layer is caught even when the global norm barely moves.
  The rule is that of the authors' released code (their Megatron-LM patch).

  During the first ``warmup_steps`` steps the whole update is clipped to the
  global norm ``max_grad_norm`` and ``gamma_i`` is the running minimum of
  tensor i's clipped norm. Afterwards, with ``n_i`` the tensor's norm,

  .. math::
    h_i = \begin{cases}
      \lambda_{rel} \gamma_i / (n_i + \epsilon)
        & \text{if } n_i > \lambda_{rel} \gamma_i \\
      1 & \text{otherwise}
    \end{cases}, \qquad g_i \leftarrow h_i\, g_i, \qquad
    \gamma_i \leftarrow \beta \gamma_i
      + (1 - \beta) \min(n_i, \lambda_{rel} \gamma_i).

  A step whose global norm is NaN or Inf leaves ``count`` and every
  ``gamma_i`` as they were, and a tensor whose norm is 0 leaves its own.
  The rule in full, and where it goes beyond the authors' code:
  :ref:`adagc-rule`.

  Args:
    lambda_rel: relative clipping threshold: a tensor is clipped when its
      norm exceeds ``lambda_rel * gamma_i``; > 0.
    beta: EMA smoothing of ``gamma``, in (0, 1).
    warmup_steps: steps of global-norm clipping that seed ``gamma``; an
      integer in [1, 2**31 - 1].
    max_grad_norm: the global norm cap during warm-up (the paper's
      ``lambda_abs``); None or inf for no cap; > 0.
    eps: added to the norms in the denominators; finite and >= 0.
    axis_name: a mesh axis name (or tuple of names) over which the
      per-tensor squared norms are ``psum``-ed (in one collective), inside
      `jax.shard_map` or `jax.pmap` when each device holds a slice of every
      tensor. Leave None on one device, for replicated gradients and under
      sharded `jax.jit` (:doc:`/guides/distributed`).

  Returns:
    An `optax.GradientTransformation` whose state is an `AdaGCState`.

  Raises:
    ValueError: if a hyperparameter given as a number or a concrete
      (non-traced) array is out of its range; the message names the
      argument. When ``update`` is traced, if a leaf of the updates is not
      floating point.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax, optax_zclip
    >>> tx = optax_zclip.adagc(warmup_steps=2, max_grad_norm=None)
    >>> state = tx.init({"a": jnp.zeros(1), "b": jnp.zeros(1)})
    >>> for b in [1.0, 1.0, 1.0, 10.0]:  # a spike in tensor "b" only
    ...   out, state = tx.update({"a": jnp.ones(1), "b": jnp.array([b])},
    ...                          state)
    >>> print(float(out["a"][0]), round(float(out["b"][0]), 3))
    1.0 1.04
    >>> print(int(state.num_clipped))
    1

  References:
    Wang et al., `AdaGC: Improving Training Stability for Large Language
    Model Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025; the
    authors' code, `lishuai-97/AdaGC <https://github.com/lishuai-97/AdaGC>`_
    (class ``AdaGC`` in ``megatron/optimizer/clip_grads.py`` of its
    Megatron-LM patch).
  """
  check = _validation.check_number
  check("lambda_rel", lambda_rel, lambda v: v > 0, "finite and > 0",
        float32=True)
  check("beta", beta, lambda v: 0 < v < 1, "in the open interval (0, 1)",
        float32=True)
  _validation.check_int("warmup_steps", warmup_steps, 1,
                        _validation.INT32_MAX)
  if max_grad_norm is not None:
    check("max_grad_norm", max_grad_norm, lambda v: v > 0,
          "None or > 0 (inf: no cap)", float32=True, inf_ok=True)
  check("eps", eps, lambda v: v >= 0, "finite and >= 0", float32=True)

  def init_fn(params):
    i32, scalar = jnp.int32, _numerics.scalar
    return AdaGCState(
        count=scalar(0, i32),
        gamma=jax.tree.map(lambda _: scalar(jnp.inf), params),
        grad_norm=scalar(0.0), clipped_norm=scalar(0.0),
        num_clipped=scalar(0, i32), nonfinite_count=scalar(0, i32),
        capped=scalar(0, i32), cap_count=scalar(0, i32))

  def update_fn(updates, state, params=None):
    del params
    _validation.check_state("adagc", state, AdaGCState)
    leaves, treedef = jax.tree.flatten(updates)
    gammas = [x.astype(F32) for x in treedef.flatten_up_to(state.gamma)]
    lam = _numerics.as_f32(lambda_rel)
    b = _numerics.as_f32(beta)
    e = _numerics.as_f32(eps)

    norms = _shared_norms.leaf_norm_list(updates, axis_name)
    norm_vector = _numerics.stack_norms(norms)
    g = _numerics.norm_of_norms(norm_vector)
    finite_g = jnp.isfinite(g)
    warm = state.count < warmup_steps

    # Warm-up: one global factor; gamma is the running min of clipped norms.
    # The factor is applied when below 1 (Megatron-LM's convention, which
    # the authors' warm-up reuses), so eps decides a norm within eps of the
    # cap.
    f = jnp.ones([], F32)
    if max_grad_norm is not None:
      # cap / 0 = inf, so a zero norm gives min(1, inf) = 1, not NaN.
      f = jnp.minimum(1.0, _numerics.as_f32(max_grad_norm) / (g + e))
      f = jnp.where(finite_g, f, 1.0)

    def rule(norm, gamma):
      """(factor, new gamma, clipped) of tensors with these norms and
      gammas: scalars, or vectors of all the tensors (elementwise)."""
      observed = jnp.isfinite(norm) & (norm > 0)
      warm_gamma = jnp.where(observed, jnp.minimum(gamma, f * norm), gamma)
      # After warm-up: per-tensor limit against gamma, then gamma's EMA. A
      # tensor with no gamma yet starts from its own norm, as in the
      # authors' code.
      ref = jnp.where(jnp.isfinite(gamma), gamma, norm)
      limit = lam * ref
      # norm > limit >= 0 implies norm > 0: `clip` is exactly where
      # clip_scale scales (a finite norm above its limit).
      clip = observed & (norm > limit)
      h = _numerics.clip_scale(norm, limit, e)
      # The EMA takes min(n, limit) itself, not h * n = limit * n / (n +
      # eps), which is smaller, by a lot for a tensor whose norm is near
      # eps.
      fed = jnp.where(clip, limit, norm)
      ema_gamma = jnp.where(observed, b * ref + (1 - b) * fed, gamma)
      # A non-finite step is not an observation for any tensor (like ZClip's
      # statistics); count does not move either, so gamma and count agree
      # on how many steps gamma has seen.
      new_gamma = jnp.where(
          finite_g, jnp.where(warm, warm_gamma, ema_gamma), gamma)
      return (jnp.where(warm, f, h), new_gamma,
              jnp.where(warm, (f < 1) & (norm > 0), clip))

    # Each tensor's factor and gamma from its own scalars (its norm and
    # gamma are buffers of their own), so that XLA compiles one kernel for
    # all the tensors of a shape (see `_numerics.leaf_norm_list`); the
    # telemetry from the same rule on the vectors of all of them, a few
    # instructions in all rather than a few per tensor.
    scales, new_gammas = [], []
    for norm, gamma in zip(norms, gammas, strict=True):
      scale, new_gamma, _ = rule(norm, gamma)
      scales.append(scale)
      new_gammas.append(new_gamma)

    out = treedef.unflatten(
        [_numerics.scale_leaf(x, s)
         for x, s in zip(leaves, scales, strict=True)])
    if norms:
      scale_vector, _, clipped = rule(norm_vector, jnp.stack(gammas))
      clipped_norm = _numerics.norm_of_norms(norm_vector * scale_vector)
      num_clipped = jnp.sum(clipped, dtype=jnp.int32)
    else:
      clipped_norm, num_clipped = g, jnp.zeros([], jnp.int32)
    # f < 1 only on a finite step above the cap (f is 1 otherwise).
    by_cap = warm & (f < 1) & (g > 0)
    new_state = AdaGCState(
        count=_numerics.increment_where(finite_g, state.count),
        gamma=treedef.unflatten(new_gammas),
        grad_norm=g,
        clipped_norm=clipped_norm,
        num_clipped=num_clipped,
        nonfinite_count=_numerics.increment_where(~finite_g,
                                                state.nonfinite_count),
        capped=by_cap.astype(jnp.int32),
        cap_count=_numerics.increment_where(by_cap, state.cap_count),
    )
    return out, new_state

  return optax.GradientTransformation(init_fn, update_fn)
