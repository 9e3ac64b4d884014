"""ZClip over a device mesh: data parallel, FSDP under jit, FSDP in shard_map.

The same Flax NNX classifier, from the same init, on the same batches (a
corrupted one every ``--spike-every`` steps), is trained four ways:

* ``single``: one device, the baseline.
* ``dp``: data parallelism under `jax.jit`. Batches are sharded over the
  ``data`` axis, parameters are replicated, so the gradients are replicated
  too (jit inserts the all-reduce): ZClip needs no ``axis_name``.
* ``fsdp``: parameters and optimizer state are sharded over ``data`` as well
  (fully sharded data parallelism under `jax.jit`). The gradients come out
  sharded; jit makes the norm global by itself: still no ``axis_name``.
* ``shard_map``: the same FSDP written by hand with `jax.shard_map`. Each
  device holds a slice of every parameter, all-gathers them for the forward
  pass, and receives a slice of the gradient (the transpose of the gather is
  a reduce-scatter). ZClip sees only that slice, so it is built with
  ``axis_name="data"`` to sum the squared norms over the mesh.

All four must make the same clipping decisions; the script prints each run's
losses, spikes and its largest difference from ``single``. On a CPU it
simulates the devices:

  python examples/distributed.py --devices 8
"""

from __future__ import annotations

import argparse

import jax

# Simulated CPU devices must be requested before JAX's backend starts.
if __name__ == "__main__":
  _pre = argparse.ArgumentParser(add_help=False)
  _pre.add_argument("--devices", type=int, default=8)
  jax.config.update("jax_num_cpu_devices", _pre.parse_known_args()[0].devices)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_zclip  # noqa: E402

MODES = ("single", "dp", "fsdp", "shard_map")


class Classifier(nnx.Module):
  """An MLP whose every dimension divides by the mesh size (8)."""

  def __init__(self, d_in: int, width: int, n_classes: int, *,
               rngs: nnx.Rngs):
    self.l1 = nnx.Linear(d_in, width, rngs=rngs)
    self.l2 = nnx.Linear(width, width, rngs=rngs)
    self.out = nnx.Linear(width, n_classes, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.gelu(self.l2(nnx.gelu(self.l1(x)))))


def loss_fn(model: Classifier, x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def make_tx(lr: float, axis_name=None) -> optax.GradientTransformation:
  return optax.chain(
      optax_zclip.zclip(warmup_steps=10, max_grad_norm=None,
                        axis_name=axis_name),
      optax.adamw(lr))


def make_batches(steps, batch, d_in, n_classes, spike_every, seed):
  """A fixed random teacher; every k-th batch has shuffled, scaled inputs."""
  rng = np.random.default_rng(seed)
  teacher = rng.standard_normal((d_in, n_classes))
  xs = rng.standard_normal((steps, batch, d_in)).astype(np.float32)
  ys = np.argmax(xs @ teacher, axis=-1).astype(np.int32)
  if spike_every > 0:
    xs[spike_every::spike_every] *= 25.0
    ys[spike_every::spike_every] = rng.integers(
        0, n_classes, ys[spike_every::spike_every].shape)
  return xs, ys


# ---------------------------------------------------------------------------
# single, dp and fsdp: nnx.Optimizer under jit; the layout is in the arrays.


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss, optax_zclip.stats(optimizer)


def run_jit(mode, model, lr, xs, ys, mesh):
  optimizer = nnx.Optimizer(model, make_tx(lr), wrt=nnx.Param)
  batch_sharding = None
  if mode != "single":
    # Parameters and optimizer state: sharded on their first axis for FSDP,
    # replicated for DP. Scalars (step counts, ZClip's statistics) are
    # always replicated.
    def layout(x):
      if mode == "fsdp" and x.ndim >= 1:
        return NamedSharding(mesh, P("data"))
      return NamedSharding(mesh, P())
    for obj in (model, optimizer):
      state = nnx.state(obj)
      nnx.update(obj, jax.device_put(state, jax.tree.map(layout, state)))
    batch_sharding = NamedSharding(mesh, P("data"))
  losses, metrics = [], []
  for x, y in zip(xs, ys, strict=True):
    if batch_sharding is not None:
      x, y = jax.device_put((x, y), batch_sharding)
    loss, s = train_step(model, optimizer, x, y)
    losses.append(loss)
    metrics.append(s)
  if mode == "fsdp":
    kernel = model.l1.kernel[...]
    assert kernel.sharding.spec == P("data"), kernel.sharding
  return losses, metrics


# ---------------------------------------------------------------------------
# shard_map: FSDP by hand; ZClip gets `axis_name` because it sees slices.


def run_shard_map(model, lr, xs, ys, mesh):
  n = mesh.shape["data"]
  graphdef, params = nnx.split(model, nnx.Param)
  tx = make_tx(lr, axis_name="data")
  sliced = jax.tree.map(lambda _: P("data"), params)
  params = jax.device_put(params, jax.tree.map(
      lambda s: NamedSharding(mesh, s), sliced))
  # The optimizer state is built inside shard_map, on the slices, so its
  # layout follows theirs; read it off once with eval_shape.
  opt_specs = jax.tree.map(
      lambda x: P() if x.ndim == 0 else P("data"),
      jax.eval_shape(tx.init, params))
  init = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=(sliced,),
                               out_specs=opt_specs))
  opt_state = init(params)

  def local_step(p_slice, opt_state, x, y):
    def local_loss(p_slice):
      full = jax.tree.map(
          lambda v: jax.lax.all_gather(v, "data", tiled=True), p_slice)
      # The mean over the whole batch is the mean of the devices' means.
      return loss_fn(nnx.merge(graphdef, full), x, y) / n
    loss, grads = jax.value_and_grad(local_loss)(p_slice)
    updates, opt_state = tx.update(grads, opt_state, p_slice)
    p_slice = optax.apply_updates(p_slice, updates)
    return (p_slice, opt_state, jax.lax.psum(loss, "data"),
            optax_zclip.stats(opt_state))

  step = jax.jit(jax.shard_map(
      local_step, mesh=mesh,
      in_specs=(sliced, opt_specs, P("data"), P("data")),
      out_specs=(sliced, opt_specs, P(), P())))
  losses, metrics = [], []
  for x, y in zip(xs, ys, strict=True):
    x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))
    params, opt_state, loss, s = step(params, opt_state, x, y)
    losses.append(loss)
    metrics.append(s)
  return losses, metrics


def main(argv: list[str] | None = None) -> dict[str, dict]:
  """Trains every mode; returns ``{mode: {"losses", "grad_norm", ...}}``."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--devices", type=int, default=8,
                 help="simulated CPU devices (set before JAX starts)")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--spike-every", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  modes = [m for m in args.modes.split(",") if m]
  for m in modes:
    if m not in MODES:
      p.error(f"--modes: unknown mode {m!r}; choose from {MODES}")

  n = jax.device_count()
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  d_in, width, n_classes = 8 * 4, 8 * 16, 8
  if args.batch % n:
    p.error(f"--batch must be a multiple of the device count {n}")
  xs, ys = make_batches(args.steps, args.batch, d_in, n_classes,
                        args.spike_every, args.seed)
  print(f"{n} devices: {jax.devices()[0].platform}; mesh {dict(mesh.shape)};"
        f" {int(np.sum(np.abs(xs).max(axis=(1, 2)) > 20))} corrupted batches")

  results = {}
  for mode in modes:
    model = Classifier(d_in, width, n_classes, rngs=nnx.Rngs(args.seed))
    if mode == "shard_map":
      losses, metrics = run_shard_map(model, args.lr, xs, ys, mesh)
    else:
      losses, metrics = run_jit(mode, model, args.lr, xs, ys, mesh)
    metrics = jax.device_get(metrics)
    results[mode] = {
        "losses": np.asarray(jax.device_get(losses), np.float64),
        "grad_norm": np.array([m["zclip/grad_norm"] for m in metrics],
                              np.float64),
        "clipped_norm": np.array([m["zclip/clipped_norm"] for m in metrics],
                                 np.float64),
        "spike_count": int(metrics[-1]["zclip/spike_count"]),
    }
  base = results[modes[0]]
  print(f"{'mode':10s} {'final loss':>10s} {'spikes':>6s} {'clipped':>7s}"
        f"  max rel. diff of loss / clipped norm vs {modes[0]}")
  for mode, r in results.items():
    clipped = int(np.sum(r["clipped_norm"] < r["grad_norm"] * (1 - 1e-6)))
    d_loss = np.max(np.abs(r["losses"] / base["losses"] - 1))
    d_norm = np.max(np.abs(r["clipped_norm"] / base["clipped_norm"] - 1))
    print(f"{mode:10s} {r['losses'][-1]:10.4f} {r['spike_count']:6d}"
          f" {clipped:7d}  {d_loss:.1e} / {d_norm:.1e}")
  return results


if __name__ == "__main__":
  main()
