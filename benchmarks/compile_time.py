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
  python benchmarks/compile_time.py --ablate no-overflow-pass,no-select

``--ablate`` compiles each variant again with parts of the package taken
out, to attribute the compile time; those steps are not usable optimizers
(see `ABLATIONS`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import variants
from memory import plain_norm_and_scale

import optax_zclip
from optax_zclip import _numerics, _skip

VARIANTS = {
    **variants.table(1e-3),
    # The norms alone, scaled into the updates: the package's overflow-safe
    # norm against a plain one.
    "clip_by_global_norm": variants.Variant(
        lambda: optax_zclip.clip_by_global_norm(1.0), False),
    "optax.tree.norm+scale": variants.Variant(plain_norm_and_scale, False),
}
BASE = "optax.clip_by_global_norm+adamw"


def _one_pass_norms(tree, axis_name=None):
  # The norms without the overflow-safe pass: inf where a leaf's float32
  # sum of squares overflows.
  leaves = _numerics.check_float_leaves(tree)
  return [jnp.sqrt(s) for s in _numerics._psum(  # noqa: SLF001
      [_numerics._leaf_sq_sum(x) for x in leaves], axis_name)]  # noqa: SLF001


def _ungated(update, keep, updates, state):
  del keep  # every step is taken
  return update(updates, state)


# Parts of the package that --ablate takes out, for attribution only: without
# the overflow pass a gradient whose sum of squares overflows float32 gets an
# infinite norm; without the select, skip_spikes still decides but never
# skips.
ABLATIONS = {
    "no-overflow-pass": (_numerics, "leaf_norm_list", _one_pass_norms),
    "no-select": (_skip, "_gated_update", _ungated),
}


@contextlib.contextmanager
def _ablated(names: tuple[str, ...]):
  saved = [(m, a, getattr(m, a)) for m, a, _ in map(ABLATIONS.get, names)]
  try:
    for module, attr, replacement in map(ABLATIONS.get, names):
      setattr(module, attr, replacement)
    yield
  finally:
    for module, attr, original in saved:
      setattr(module, attr, original)


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


def compile_seconds(name: str, params: dict[str, jax.Array],
                    ablate: tuple[str, ...] = ()
                    ) -> tuple[float, float, float]:
  """(trace, lower, compile) seconds of variant ``name``'s step, with the
  parts ``ablate`` names taken out (`ABLATIONS`)."""
  with _ablated(ablate):
    return _compile_seconds(name, params)


def _compile_seconds(name: str, params: dict[str, jax.Array]
                     ) -> tuple[float, float, float]:
  jax.clear_caches()
  make, takes_value = VARIANTS[name]
  tx = make()
  state = tx.init(params)
  extra = {"value": jnp.float32(1.0)} if takes_value else {}

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
  p.add_argument("--ablate", default="",
                 help="also compile every variant without these parts, "
                      "one row each (comma-separated, from "
                      f"{', '.join(ABLATIONS)}; 'all' for all of them "
                      "together); for attribution only")
  args = p.parse_args(argv)
  names = args.variants.split(",")
  unknown = set(names) - set(VARIANTS)
  if unknown:
    p.error(f"unknown variants {sorted(unknown)}; choose from "
            f"{', '.join(VARIANTS)}")
  cuts = [tuple(ABLATIONS) if a == "all" else (a,)
          for a in args.ablate.split(",") if a]
  bad = {a for cut in cuts for a in cut} - set(ABLATIONS)
  if bad:
    p.error(f"unknown --ablate {sorted(bad)}; choose from "
            f"{', '.join(ABLATIONS)} or all")
  rows = [(n, ()) for n in names]
  for cut in cuts:
    rows += [(n, _relevant(n, cut)) for n in names
             if _relevant(n, cut) and (n, _relevant(n, cut)) not in rows]
  params = tree(args.leaves, args.distinct_shapes)
  times: dict[tuple[str, tuple[str, ...]], list[tuple[float, float, float]]]
  times = {r: [] for r in rows}
  for _ in range(args.reps):
    for name, cut in rows:
      times[name, cut].append(compile_seconds(name, params, cut))
  total = {r: statistics.median(sum(t) for t in ts) for r, ts in times.items()}
  base = total.get((BASE, ()))
  kind = "bf16 leaves of distinct shapes" if args.distinct_shapes else (
      "bf16 leaves")
  print(f"# compile time of the donated optimizer step: {args.leaves} {kind}"
        f", median of {args.reps}; {platform.machine()}, jax "
        f"{jax.__version__}, optax {optax.__version__}, "
        f"{datetime.date.today()}")
  print("| variant | trace s | lower s | compile s | total s | ratio |")
  print("|---|---|---|---|---|---|")
  for name, cut in rows:
    parts = [statistics.median(t[i] for t in times[name, cut])
             for i in range(3)]
    ratio = f"{total[name, cut] / base:.2f}" if base else "-"
    label = name + "".join(f", {c}" for c in cut)
    print(f"| {label} | " + " | ".join(f"{x:.2f}" for x in parts)
          + f" | {total[name, cut]:.2f} | {ratio} |")


def _relevant(name: str, cut: tuple[str, ...]) -> tuple[str, ...]:
  """The parts in ``cut`` whose removal changes variant ``name``'s step."""
  if name == "adamw" or name.startswith("optax."):  # optax alone
    return ()
  return tuple(c for c in cut
               if c == "no-overflow-pass" or VARIANTS[name].takes_value)


if __name__ == "__main__":
  main()
