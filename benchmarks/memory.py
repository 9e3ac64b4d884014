"""Peak memory and memory traffic of a donated train step, from XLA itself.

For each chain of ``benchmarks/variants.py`` (every clipping transform
chained before AdamW, alone and wrapped in `optax_zclip.skip_spikes`), for
``optax.apply_if_finite`` and for ``skip_spikes(..., zero_copy=False)`` (the
whole-state select after the update, which `skip_spikes` also falls back to
where its zero-copy select cannot run),
compiles a donated ``jax.jit`` train step (forward, backward, update,
``optax.apply_updates``) on 16 float32 (or bfloat16) matrices of 1024x1024
(64 MiB of float32 parameters) and prints, over bare ``optax.adamw``:

* the peak temporary memory, ``compiled.memory_analysis().temp_size_in_bytes``;
* the bytes accessed, ``compiled.cost_analysis()["bytes accessed"]``,

both in units of the parameters' bytes. Both analyses are deterministic (no
timing), so ``tests/test_cost.py`` pins the same numbers on a smaller step.
XLA's cost model counts a conditional as its costliest branch: the norms'
rescaled pass, which runs only on a step whose float32 sum of squares
overflowed, counts as one read of the gradients although a normal step does
not run it.

  python benchmarks/memory.py
  python benchmarks/memory.py --matrices 8 --size 512
  python benchmarks/memory.py --dtype bfloat16
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
import variants

import optax_zclip


def plain_norm_and_scale() -> optax.GradientTransformation:
  """The floor of any unfused global clip: a plain global L2 norm and a
  scale by ``1 / max(norm, 1)``, one read of the gradients and nothing
  else."""

  def update(updates, state, params=None):
    del params
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(x))
                        for x in jax.tree.leaves(updates)))
    scale = 1.0 / jnp.maximum(norm, 1.0)
    return jax.tree.map(lambda x: x * scale, updates), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


# The shared chains, with optax's select after the update as an anchor.
VARIANTS = {
    **variants.table(1e-3),
    "optax.apply_if_finite(adamw)": variants.Variant(
        lambda: optax.apply_if_finite(optax.adamw(1e-3), 3), False),
}


# The select after the update, as skip_spikes(..., zero_copy=False) makes it.
AFTER = "skip_spikes(zclip+adamw), zero_copy=False"


def selecting_after() -> optax.GradientTransformation:
  """`AFTER`'s optimizer."""
  return optax_zclip.skip_spikes(
      optax.chain(optax_zclip.zclip(), optax.adamw(1e-3)), zero_copy=False)


def analyse(tx: optax.GradientTransformation, with_value: bool,
            matrices: int = 16, size: int = 1024,
            dtype: str = "float32") -> tuple[int, float]:
  """(peak temp bytes, bytes accessed) of the compiled donated train step,
  its parameters (and so its gradients) of ``dtype``."""
  params = {f"w{i:02d}": jnp.zeros((size, size), dtype)
            for i in range(matrices)}
  state = tx.init(params)
  x = jnp.ones((8, size), dtype)

  def loss_fn(p):
    return sum(jnp.mean(jnp.tanh(x @ w)) for w in p.values())

  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    extra = {"value": loss} if with_value else {}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params,
                                                         state).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older jax
    cost = cost[0]
  return (compiled.memory_analysis().temp_size_in_bytes,
          float(cost["bytes accessed"]))


def table(matrices: int = 16, size: int = 1024,
          dtype: str = "float32") -> dict[str, tuple[float, float]]:
  """name -> (extra peak temp, extra bytes accessed) over bare AdamW, in
  units of the parameters' bytes."""
  param_bytes = matrices * size * size * jnp.dtype(dtype).itemsize
  rows = {name: analyse(make(), v, matrices, size, dtype)
          for name, (make, v) in VARIANTS.items()}
  rows[AFTER] = analyse(selecting_after(), True, matrices, size, dtype)
  temp0, bytes0 = rows["adamw"]
  return {name: ((t - temp0) / param_bytes, (b - bytes0) / param_bytes)
          for name, (t, b) in rows.items()}


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--matrices", type=int, default=16)
  p.add_argument("--size", type=int, default=1024)
  p.add_argument("--dtype", default="float32",
                 choices=["float32", "bfloat16"],
                 help="of the parameters and gradients")
  args = p.parse_args(argv)
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{args.matrices} {args.dtype} matrices of {args.size}x{args.size}")
  print("| step | extra peak temp | extra bytes accessed |")
  print("|---|---|---|")
  for name, (temp, nbytes) in table(args.matrices, args.size,
                                    args.dtype).items():
    print(f"| `{name}` | {temp:+.3f}x | {nbytes:+.2f}x |")


if __name__ == "__main__":
  main()
