"""Runs MaxText's own pre-training loop with the guide's patch applied.

    python tests/maxtext/run_maxtext.py [--zclip] [--skip-spikes]
        [--spike-step K --spike-scale S] [--memory-json PATH]
        -- KEY=VALUE ...

The ``KEY=VALUE`` overrides go to MaxText's config system on top of its own
``configs/base.yml``, and ``maxtext.trainers.pre_train.train.main`` runs
them: its config, train loop, sharding, Orbax checkpointing and metric
writer, unchanged but for what the options below patch.

* ``--zclip`` / ``--skip-spikes``: ``maxtext_zclip.patch(zclip=...,
  skip_spikes=...)``, the Integrations guide's patch; both flags make the
  guide's ``patch()``, as its ``train_zclip.py`` applies it.
* ``--spike-step K --spike-scale S``: a bad batch at step K (counted from
  0, as MaxText's optimizer counts): that step's loss, and so its
  gradient, is S times the batch's own, inside MaxText's train step. The
  synthetic data repeats one batch, so a bad batch cannot come from the
  data; this is one whose loss and gradients are S times too large.
* ``--memory-json PATH``: writes the ``memory_analysis()`` of the train
  step MaxText compiles (the one it trains with) to PATH and exits before
  the first step.
"""

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

# The tiny decoder the tests and benchmarks/maxtext_memory.py run, on
# MaxText's synthetic data (one batch of random tokens, repeated). float32
# activations (MaxText's default is bfloat16), so that a run on 8 devices can
# match the run on one to float32 rounding. MaxText's fixed clipping is off:
# it would clip before ZClip sees the norm.
TINY = [
    "base_emb_dim=64", "base_num_query_heads=4", "base_num_kv_heads=4",
    "head_dim=16", "base_mlp_dim=128", "base_num_decoder_layers=2",
    "vocab_size=256", "max_target_length=64", "dtype=float32",
    "dataset_type=synthetic", "skip_jax_distributed_system=true",
    "gradient_clipping_threshold=0",
]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--zclip", action="store_true")
  parser.add_argument("--skip-spikes", action="store_true")
  parser.add_argument("--spike-step", type=int)
  parser.add_argument("--spike-scale", type=float, default=30.0)
  parser.add_argument("--memory-json")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args(argv)

  import maxtext_zclip  # noqa: PLC0415 (after sys.path)
  if args.zclip or args.skip_spikes:
    maxtext_zclip.patch(zclip=args.zclip, skip_spikes=args.skip_spikes)

  import jax.numpy as jnp  # noqa: PLC0415
  from absl import app  # noqa: PLC0415
  from maxtext.trainers.pre_train import train  # noqa: PLC0415
  from maxtext.utils import max_utils  # noqa: PLC0415

  watch_train_step(train)
  if args.spike_step is not None:
    inject_spike(train, jnp, args.spike_step, args.spike_scale)
  if args.memory_json:
    capture_memory(max_utils, args.memory_json)

  base_yml = pathlib.Path(train.__file__).parents[2] / "configs" / "base.yml"
  app.run(train.main, argv=[sys.argv[0], str(base_yml), *args.overrides])


def inject_spike(train, jnp, spike_step, scale):
  """Multiplies the loss of step ``spike_step`` by ``scale`` in MaxText's
  train step. MaxText's `loss_fn` does not see the step, so the train step
  hands the traced step counter to it (both run in the same trace)."""
  real_loss_fn = train.loss_fn

  def loss_fn(*args, **kwargs):
    loss, aux = real_loss_fn(*args, **kwargs)
    if "step" in TRACED:  # not in the eval step
      loss = loss * jnp.where(TRACED["step"] == spike_step, scale, 1.0)
    return loss, aux

  # train_step looks it up as a module global when it runs.
  train.loss_fn = loss_fn


# What the train step being traced holds, for the patches above and below.
TRACED = {}


def watch_train_step(train):
  """Wraps MaxText's train step so that, while it is traced, `TRACED`
  holds its step counter and the bytes of the model's parameters."""
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  real_train_step = train.train_step

  def train_step(model, config, state_mesh_shardings, params_shardings,
                 state, data, dropout_rng=None):
    TRACED["step"] = state["optimizer"]["step"][...]
    params = nnx.state(nnx.merge(model, state).model, nnx.Param)
    TRACED["param_bytes"] = sum(x.size * x.dtype.itemsize
                                for x in jax.tree.leaves(params))
    try:
      return real_train_step(model, config, state_mesh_shardings,
                             params_shardings, state, data, dropout_rng)
    finally:
      TRACED.pop("step")

  # train_loop looks it up as a module global when it runs.
  train.train_step = train_step


def capture_memory(max_utils, path):
  """MaxText prints the compiled train step's memory_analysis() through
  this function; keep the numbers, and stop before training."""
  def print_compiled_memory_stats(stats, prefix=""):
    if prefix != "train":
      return
    fields = ("temp_size_in_bytes", "argument_size_in_bytes",
              "output_size_in_bytes", "alias_size_in_bytes")
    numbers = {f: int(getattr(stats, f)) for f in fields}
    numbers["param_bytes"] = int(TRACED["param_bytes"])
    pathlib.Path(path).write_text(json.dumps(numbers))
    os._exit(0)  # the numbers are all this run is for

  max_utils.print_compiled_memory_stats = print_compiled_memory_stats


if __name__ == "__main__":
  main()
