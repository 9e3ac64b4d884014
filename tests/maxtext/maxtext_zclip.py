"""maxtext_zclip.py: ZClip and skip_spikes in MaxText 0.2.5's optimizer.

Call `patch()` before MaxText's trainer builds its optimizer, then run the
trainer as usual, with ``gradient_clipping_threshold=0`` (MaxText's fixed
clipping runs before the optimizer and would clip before ZClip sees the
norm).
"""

import optax
from maxtext.optimizers import optimizers

import optax_zclip


def loss_as_value(tx):
  """MaxText hands a skip wrapper `loss=` and `grad_norm=`; skip_spikes
  reads the loss from `value=` and measures the norm itself."""
  def update(updates, state, params=None, *, loss=None, grad_norm=None,
             **extra_args):
    del grad_norm  # taken after MaxText's fixed clipping; ours is the raw one
    return tx.update(updates, state, params, value=loss, **extra_args)
  return optax.GradientTransformationExtraArgs(tx.init, update)


def patch(*, zclip=True, skip_spikes=True, **zclip_kwargs):
  """Puts ZClip first in MaxText's optimizer (`optax_zclip.zclip(
  **zclip_kwargs)` before AdamW) and, with ``skip_spikes``, has
  `optax_zclip.skip_spikes` stand in for MaxText's `skip_step_on_spikes`,
  with MaxText's keys: ``skip_step_on_spikes=true`` turns it on,
  ``skip_step_interval`` is its window, ``skip_step_scaling_factor`` its
  sigma. ZClip goes inside the skip wrapper, so that the wrapper tests the
  raw norm and a skipped step leaves ZClip's statistics untouched."""
  maxtext_get_optimizer = optimizers.get_optimizer
  maxtext_skip_step_on_spikes = optimizers.skip_step_on_spikes

  def skip_step_on_spikes(inner, interval, scaling_factor):
    if zclip:
      inner = optax.chain(optax_zclip.zclip(**zclip_kwargs), inner)
    if skip_spikes:
      return loss_as_value(optax_zclip.skip_spikes(
          inner, window=interval, sigma=scaling_factor))
    return maxtext_skip_step_on_spikes(inner, interval, scaling_factor)

  def get_optimizer(config, *args, **kwargs):
    tx = maxtext_get_optimizer(config, *args, **kwargs)
    if zclip and not config.skip_step_on_spikes:  # else in the wrapper above
      tx = optax.chain(optax_zclip.zclip(**zclip_kwargs), tx)
    return tx

  # get_optimizer calls skip_step_on_spikes, and the trainer get_optimizer,
  # through the module's attributes, so replacing those is enough.
  optimizers.skip_step_on_spikes = skip_step_on_spikes
  optimizers.get_optimizer = get_optimizer
