"""How long an optimizer step takes to compile, for a tree of many leaves.

Compile time grows with the number of parameter arrays: XLA emits a few
kernels per leaf, and compiles a kernel once for all the leaves it fits
(same shape, same computation). This script builds a tree of ``--leaves``
leaves of ``--dtype`` (``--shapes two``: alternately 64 and 64x64 elements,
the vectors and matrices of a deep model's repeated blocks; ``distinct``:
each its own shape, 64x(40+i); ``random``: 1-d or 2-d, each side drawn from
1 to 95, seeded), and for each variant the ``jax.jit`` optimizer step
(``tx.update`` and `optax.apply_updates`; `optax_zclip.skip_spikes` gets
``value=``), with its parameters and state donated, not donated, or both
(``--donate``). It times tracing, lowering and XLA's compilation from empty
caches (`jax.clear_caches`), every row once per repetition, alternating,
and reports the medians and the total as a ratio to
``optax.clip_by_global_norm`` followed by AdamW, compiled the same way.

``--barrier on,off`` compiles this package's variants a second time with
``jax.lax.optimization_barrier`` replaced by the identity: the barrier that
keeps the norm's read of each leaf out of the update's fusions (what it
buys: the Performance guide's memory tables), to see what it costs in
compile time. Those steps compute the same values.

  python benchmarks/compile_time.py                    # 200 bf16 leaves
  python benchmarks/compile_time.py --leaves 200 --shapes random \
    --dtype float32 --donate both --barrier on,off \
    --variants optax.clip_by_global_norm+adamw,zclip+adamw,adagc+adamw
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import time
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import variants
from memory import plain_norm_and_scale

import optax_zclip

VARIANTS = {
    **variants.table(1e-3),
    # The norms alone, scaled into the updates: the package's overflow-safe
    # norm against a plain one.
    "clip_by_global_norm": variants.Variant(
        lambda: optax_zclip.clip_by_global_norm(1.0), False),
    "optax.tree.norm+scale": variants.Variant(plain_norm_and_scale, False),
}
BASE = "optax.clip_by_global_norm+adamw"


def _is_ours(name: str) -> bool:
  """Whether variant ``name`` holds a transform of this package (the base
  and bare AdamW do not: the barrier is not theirs)."""
  return not (name == "adamw" or name.startswith("optax."))


@contextlib.contextmanager
def barrier(on: bool) -> Iterator[None]:
  """Within the block, ``jax.lax.optimization_barrier`` is the identity
  unless ``on``. The barrier changes no value, only what XLA may fuse."""
  real = jax.lax.optimization_barrier
  if not on:
    jax.lax.optimization_barrier = lambda x: x
  try:
    yield
  finally:
    jax.lax.optimization_barrier = real


def tree(leaves: int, shapes: str = "two", dtype: str = "bfloat16"
         ) -> dict[str, jax.Array]:
  """``leaves`` arrays of ``dtype``, shaped as ``shapes`` says (see the
  module docstring)."""
  rng = np.random.default_rng(0)

  def shape(i):
    if shapes == "distinct":
      return (64, 40 + i)
    if shapes == "random":
      return tuple(int(n) for n in rng.integers(1, 96, rng.integers(1, 3)))
    return (64, 64) if i % 2 else (64,)

  return {f"p{i:04d}": jnp.asarray(rng.normal(size=shape(i)), dtype)
          for i in range(leaves)}


class Row(NamedTuple):
  """One compiled step: the variant, whether its arguments are donated and
  whether the barrier is on."""

  name: str
  donate: bool = True
  barrier: bool = True


def compile_seconds(row: Row, params: dict[str, jax.Array]
                    ) -> tuple[float, float, float]:
  """(trace, lower, compile) seconds of ``row``'s step, from empty caches."""
  with barrier(row.barrier):
    jax.clear_caches()
    make, takes_value = VARIANTS[row.name]
    tx = make()
    state = tx.init(params)
    extra = {"value": jnp.float32(1.0)} if takes_value else {}

    def step(p, s, g):
      u, s = tx.update(g, s, p, **extra)
      return optax.apply_updates(p, u), s

    donate = (0, 1) if row.donate else ()
    t0 = time.perf_counter()
    traced = jax.jit(step, donate_argnums=donate).trace(params, state, params)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
  return t1 - t0, t2 - t1, t3 - t2


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--leaves", type=int, default=200)
  p.add_argument("--shapes", default="two",
                 choices=["two", "distinct", "random"])
  p.add_argument("--dtype", default="bfloat16",
                 choices=["float32", "bfloat16"])
  p.add_argument("--reps", type=int, default=3,
                 help="alternating compilations of each step (median)")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--donate", default="yes", choices=["yes", "no", "both"],
                 help="donate the step's parameters and state")
  p.add_argument("--barrier", default="on",
                 help="on, off or on,off: this package's variants with the "
                      "norm's optimization barrier, without, or both")
  args = p.parse_args(argv)
  names = args.variants.split(",")
  unknown = set(names) - set(VARIANTS)
  if unknown:
    p.error(f"unknown variants {sorted(unknown)}; choose from "
            f"{', '.join(VARIANTS)}")
  barriers = args.barrier.split(",")
  if not barriers or set(barriers) - {"on", "off"}:
    p.error(f"--barrier takes on, off or on,off; got {args.barrier!r}")
  donations = {"yes": [True], "no": [False], "both": [True, False]}[
      args.donate]
  rows = [Row(n, d, b == "on") for d in donations for n in names
          for b in barriers if b == "on" or _is_ours(n)]
  params = tree(args.leaves, args.shapes, args.dtype)
  times: dict[Row, list[tuple[float, float, float]]] = {r: [] for r in rows}
  for _ in range(args.reps):
    for row in rows:
      times[row].append(compile_seconds(row, params))
  total = {r: statistics.median(sum(t) for t in ts) for r, ts in times.items()}
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"# compile time of the optimizer step: {args.leaves} {args.dtype} "
        f"leaves, shapes {args.shapes}, median of {args.reps}; "
        f"{platform.machine()}, {os.cpu_count()} cores, load {load:.1f}, "
        f"jax {jax.__version__}, optax {optax.__version__}, "
        f"{datetime.date.today()}")
  print("| variant | donated | barrier | trace s | lower s | compile s "
        "| total s | ratio |")
  print("|---|---|---|---|---|---|---|---|")
  for row in rows:
    parts = [statistics.median(t[i] for t in times[row]) for i in range(3)]
    base = total.get(Row(BASE, row.donate, True))
    ratio = f"{total[row] / base:.2f}" if base else "-"
    print(f"| {row.name} | {'yes' if row.donate else 'no'} | "
          f"{('on' if row.barrier else 'off') if _is_ours(row.name) else '-'}"
          " | " + " | ".join(f"{x:.2f}" for x in parts)
          + f" | {total[row]:.2f} | {ratio} |")


if __name__ == "__main__":
  main()
