"""Quickstart: ZClip in a Flax NNX training loop, with logged telemetry.

A small MLP learns a noisy regression. Every ``--spike-every`` steps a batch
arrives with corrupted targets (a data glitch), whose gradient norm is far
above the usual. The same model, from the same init, on the same batches, is
trained with no clipping, with fixed-threshold clipping and with ZClip, by
one jitted train step that donates the model and optimizer (updated in place,
as real trainers do) and returns what the clipping transform logged; the
script prints that at the glitches and the final held-out loss of each run.

  python examples/quickstart.py --steps 400
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_zclip


class MLP(nnx.Module):
  """Two hidden layers with GELU."""

  def __init__(self, d_in: int, width: int, *, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(d_in, width, rngs=rngs)
    self.l2 = nnx.Linear(width, width, rngs=rngs)
    self.out = nnx.Linear(width, 1, rngs=rngs)

  def __call__(self, x):
    x = nnx.gelu(self.l1(x))
    x = nnx.gelu(self.l2(x))
    return self.out(x)[..., 0]


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((model(x) - y) ** 2)


# Model and optimizer are donated: their buffers are updated in place.
@nnx.jit(donate_argnums=(0, 1))
def train_step(model: MLP, optimizer: nnx.Optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  # Telemetry comes back with the loss: no extra host sync inside the step.
  # Every method logs the same way (no clipping is clip_by_global_norm(None)).
  return loss, optax_zclip.stats(optimizer)


def make_data(steps: int, batch: int, d_in: int, spike_every: int,
              seed: int):
  """Batches of ``y = sin(x @ w) + noise``; every k-th batch is corrupted."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(d_in) / np.sqrt(d_in)
  xs = rng.standard_normal((steps, batch, d_in)).astype(np.float32)
  ys = (np.sin(xs @ w) + 0.1 * rng.standard_normal((steps, batch)))
  glitch = np.zeros(steps, bool)
  if spike_every > 0:
    glitch[spike_every::spike_every] = True
  ys[glitch] *= 40.0
  x_eval = rng.standard_normal((1024, d_in)).astype(np.float32)
  y_eval = np.sin(x_eval @ w)
  return xs, ys.astype(np.float32), glitch, x_eval, y_eval.astype(np.float32)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
  """Runs the comparison; returns ``{method: {"eval_loss", ...}}``."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--spike-every", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  d_in = 16
  xs, ys, glitch, x_eval, y_eval = make_data(
      args.steps, args.batch, d_in, args.spike_every, args.seed)
  # Each method and the kind that prefixes its keys in `stats`
  # ("clip/grad_norm", "zclip/grad_norm", ...).
  methods = {
      "no clipping": (optax_zclip.clip_by_global_norm(None), "clip"),
      "clip_by_global_norm(1.0)": (optax_zclip.clip_by_global_norm(1.0),
                                   "clip"),
      "zclip": (optax_zclip.zclip(alpha=0.97, z_thresh=2.5, warmup_steps=25,
                                  max_grad_norm=None), "zclip"),
  }
  results = {}
  for name, (clip, kind) in methods.items():
    model = MLP(d_in, 64, rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(
        model, optax.chain(clip, optax.adamw(args.lr)), wrt=nnx.Param)
    flagged_glitches = 0
    print(name)
    for t in range(args.steps):
      loss, s = train_step(model, optimizer, xs[t], ys[t])
      if glitch[t]:
        s = jax.device_get(s)  # every metric to the host in one transfer
        norm, clipped = s[f"{kind}/grad_norm"], s[f"{kind}/clipped_norm"]
        flagged_glitches += int(clipped < norm)
        z = f"  z {s['zclip/z_score']:7.1f}" if kind == "zclip" else ""
        print(f"  step {t:4d} glitch: grad_norm {norm:8.2f}{z}"
              f"  threshold {s[f'{kind}/threshold']:6.2f}  -> clipped_norm "
              f"{clipped:6.2f}")
    eval_loss = float(loss_fn(model, jnp.asarray(x_eval), jnp.asarray(y_eval)))
    results[name] = {"eval_loss": eval_loss, "final_loss": float(loss),
                     "clipped_glitches": flagged_glitches,
                     "glitches": int(glitch.sum())}
    print(f"{name:26s} final train loss {float(loss):.4f}"
          f"  eval loss {eval_loss:.4f}")
    if name == "zclip":
      print(f"{'':26s} spikes detected {int(s['zclip/spike_count'])},"
            f" glitches injected {int(glitch.sum())}, clipped"
            f" {flagged_glitches}")
      results[name]["spike_count"] = int(s["zclip/spike_count"])
  return results


if __name__ == "__main__":
  main()
