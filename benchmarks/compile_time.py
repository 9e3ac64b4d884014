"""How long an optimizer step takes to compile, for a tree of many leaves.

Compile time grows with the number of parameter arrays: XLA emits a few
kernels per leaf, and each is generated and compiled on its own. This script
builds a tree of ``--leaves`` bfloat16 leaves (alternately 64 and 64x64
elements, the vectors and matrices of a deep model), and for each variant the
donated ``jax.jit`` optimizer step (``tx.update`` and
`optax.apply_updates`; `optax_zclip.skip_spikes` gets ``value=``). It times
tracing, lowering and XLA's compilation from empty caches
(`jax.clear_caches`), in alternating repetitions, and reports the medians
and the total as a ratio to ``optax.clip_by_global_norm`` followed by AdamW.

  python benchmarks/compile_time.py                    # 500 leaves, 3 reps
  python benchmarks/compile_time.py --leaves 100 --variants adamw,zclip+adamw
  python benchmarks/compile_time.py --leaves 300 --variants adamw \
    --distinct-shapes
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from memory import plain_norm_and_scale

import optax_zclip

VARIANTS = {
    "adamw": lambda: optax.adamw(1e-3),
    "optax.clip_by_global_norm+adamw": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    "clip_by_global_norm+adamw": lambda: optax.chain(
        optax_zclip.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    "zclip+adamw": lambda: optax.chain(optax_zclip.zclip(),
                                       optax.adamw(1e-3)),
    "adagc+adamw": lambda: optax.chain(optax_zclip.adagc(),
                                       optax.adamw(1e-3)),
    "skip_spikes(zclip+adamw)": lambda: optax_zclip.skip_spikes(
        optax.chain(optax_zclip.zclip(), optax.adamw(1e-3))),
    "skip_spikes(adamw)": lambda: optax_zclip.skip_spikes(optax.adamw(1e-3)),
    # The norms alone, scaled into the updates: the package's overflow-safe
    # norm against a plain one.
    "clip_by_global_norm": lambda: optax_zclip.clip_by_global_norm(1.0),
    "optax.tree.norm+scale": plain_norm_and_scale,
}
BASE = "optax.clip_by_global_norm+adamw"


def tree(leaves: int, distinct: bool = False) -> dict[str, jax.Array]:
  """``leaves`` bf16 arrays, alternately of shape (64,) and (64, 64), or
  with ``distinct`` each of its own shape, (64, 40 + i)."""
  rng = np.random.default_rng(0)

  def shape(i):
    if distinct:
      return (64, 40 + i)
    return (64, 64) if i % 2 else (64,)

  return {f"p{i:04d}": jnp.asarray(rng.normal(size=shape(i)), jnp.bfloat16)
          for i in range(leaves)}


def compile_seconds(name: str, params: dict[str, jax.Array]
                    ) -> tuple[float, float, float]:
  """(trace, lower, compile) seconds of variant ``name``'s step."""
  jax.clear_caches()
  tx = VARIANTS[name]()
  state = tx.init(params)
  extra = {"value": jnp.float32(1.0)} if name.startswith("skip") else {}

  def step(p, s, g):
    u, s = tx.update(g, s, p, **extra)
    return optax.apply_updates(p, u), s

  t0 = time.perf_counter()
  traced = jax.jit(step, donate_argnums=(0, 1)).trace(params, state, params)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  lowered.compile()
  t3 = time.perf_counter()
  return t1 - t0, t2 - t1, t3 - t2


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--leaves", type=int, default=500)
  p.add_argument("--reps", type=int, default=3,
                 help="alternating compilations of each step (median)")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--distinct-shapes", action="store_true",
                 help="give every leaf a shape of its own (no kernel is "
                      "shared between leaves)")
  args = p.parse_args(argv)
  names = args.variants.split(",")
  unknown = set(names) - set(VARIANTS)
  if unknown:
    p.error(f"unknown variants {sorted(unknown)}; choose from "
            f"{', '.join(VARIANTS)}")
  params = tree(args.leaves, args.distinct_shapes)
  times: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
  for _ in range(args.reps):
    for name in names:
      times[name].append(compile_seconds(name, params))
  total = {n: statistics.median(sum(t) for t in ts) for n, ts in times.items()}
  base = total.get(BASE)
  kind = "bf16 leaves of distinct shapes" if args.distinct_shapes else (
      "bf16 leaves")
  print(f"# compile time of the donated optimizer step: {args.leaves} {kind}"
        f", median of {args.reps}; {platform.machine()}, jax "
        f"{jax.__version__}, optax {optax.__version__}, "
        f"{datetime.date.today()}")
  print("| variant | trace s | lower s | compile s | total s | ratio |")
  print("|---|---|---|---|---|---|")
  for name in names:
    parts = [statistics.median(t[i] for t in times[name]) for i in range(3)]
    ratio = f"{total[name] / base:.2f}" if base else "-"
    print(f"| {name} | " + " | ".join(f"{x:.2f}" for x in parts)
          + f" | {total[name]:.2f} | {ratio} |")


if __name__ == "__main__":
  main()
