"""ZClip + AdamW per optimizer step: the authors' PyTorch ZClip against ours.

Times, on the parameter shapes of a `train_step.py` model size and the same
fixed gradients, the optimizer step a PyTorch user runs (the authors'
``ZClip.step(model)`` from the PyPI package ``zclip`` 1.0.0, then
``torch.optim.AdamW(foreach=True).step()``) against this package's
``optax.chain(optax_zclip.zclip(), optax.adamw(lr))`` in a jitted step that
donates params and state, and bare AdamW in each framework. The variants run
in alternating rounds (the order rotates every round); each round gives the
ratio of every variant to the PyTorch ZClip + AdamW step, and the table
reports its median over rounds with min and max.

Both sides use their defaults (ZClip's ``max_grad_norm=1.0``, warm-up 25
steps, run before timing) and the gradients' global norm is below 1.0 and
constant, so every timed step is the common one: the norm is measured, the
statistics are updated and nothing is clipped (PyTorch then skips its
in-place multiply; JAX multiplies by 1 inside AdamW's pass, as on any step).

torch and zclip are not dependencies of this package; install them apart,
for instance in a virtual environment of their own::

  # in a virtual environment of its own, activated (not your JAX one)
  pip install torch==2.13.0 zclip==1.0.0 -e .
  python benchmarks/vs_pytorch.py --size 23m
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_zclip

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# Both runtimes share the cores in one process, taking turns. OpenMP threads
# spin after each torch call by default and starve XLA's, and the other way
# round (torch measured 3 to 9 times slower, and far noisier, that way);
# set before torch is imported, so that idle threads sleep.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import train_step  # noqa: E402

LR, WEIGHT_DECAY = 1e-4, 1e-4  # optax.adamw's weight decay, set in torch too
REF = "torch ZClip+AdamW"


def param_shapes(size: str) -> list[tuple[int, ...]]:
  """Shapes of the parameters of the demo's model at ``size``."""
  model = train_step.Llama(train_step.SIZES[size].model, rngs=nnx.Rngs(0))
  return [tuple(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def torch_variants(host_grads: list[np.ndarray]):
  """``{name: step}`` for PyTorch AdamW with and without the authors' ZClip."""
  import torch  # noqa: PLC0415 (optional)
  from zclip import ZClip  # noqa: PLC0415 (optional)

  def build(with_zclip):
    params = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.zeros(g.shape)) for g in host_grads])
    for p, g in zip(params, host_grads, strict=True):
      p.grad = torch.from_numpy(g)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY,
                            foreach=True)
    zclip = ZClip() if with_zclip else None

    def step():
      if zclip is not None:
        zclip.step(params)  # ends with a host sync (.item()), as in training
      opt.step()

    return step, lambda: params[0].data.sum().item()

  return {"torch AdamW": build(False), REF: build(True)}


def jax_variants(host_grads: list[np.ndarray]):
  """``{name: step}`` for optax AdamW with and without `optax_zclip.zclip`."""
  grads = [jax.device_put(g) for g in host_grads]

  def build(tx):
    params = [jnp.zeros(g.shape) for g in host_grads]
    state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    box = [params, state]

    def step():
      box[:] = update(box[0], box[1], grads)

    return step, lambda: jax.block_until_ready(box[0])

  return {"optax AdamW": build(optax.adamw(LR)),
          "optax_zclip zclip+AdamW": build(optax.chain(
              optax_zclip.zclip(), optax.adamw(LR)))}


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="23m", choices=list(train_step.SIZES))
  p.add_argument("--rounds", type=int, default=16)
  p.add_argument("--iters", type=int, default=10, help="steps per round")
  p.add_argument("--warmup", type=int, default=30,
                 help="untimed steps first (ZClip's warm-up is 25)")
  args = p.parse_args(argv)
  import torch  # noqa: PLC0415 (optional)

  shapes = param_shapes(args.size)
  rng = np.random.default_rng(0)
  n = sum(int(np.prod(s)) for s in shapes)
  # A global norm of 0.5: below ZClip's max_grad_norm, so nothing is clipped.
  host_grads = [(rng.standard_normal(s) * 0.5 / n ** 0.5).astype(np.float32)
                for s in shapes]
  runs = {**torch_variants(host_grads), **jax_variants(host_grads)}
  names = list(runs)
  for step, sync in runs.values():
    for _ in range(args.warmup):
      step()
    sync()

  per_step: dict[str, list[float]] = {k: [] for k in names}
  for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      step, sync = runs[name]
      t0 = time.perf_counter()
      for _ in range(args.iters):
        step()
      sync()
      per_step[name].append((time.perf_counter() - t0) / args.iters)

  print(f"# optimizer step, {n / 1e6:.2f}M float32 params in {len(shapes)} "
        f"leaves (model size {args.size}); {args.rounds} rounds x "
        f"{args.iters} steps; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"jax {jax.__version__}, optax {optax.__version__}, "
        f"{datetime.date.today()}")
  print()
  print(f"| variant | ms/step (median) | vs {REF} (median [min, max]) |")
  print("|---|---|---|")
  for name in names:
    rs = [a / b for a, b in zip(per_step[name], per_step[REF], strict=True)]
    print(f"| {name} | {1e3 * statistics.median(per_step[name]):.2f} | "
          f"{statistics.median(rs):.3f} [{min(rs):.3f}, {max(rs):.3f}] |")


if __name__ == "__main__":
  main()
