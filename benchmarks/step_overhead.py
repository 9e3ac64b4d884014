"""What clipping costs per optimizer step, measured side by side.

A jitted optimizer step (``tx.update`` + ``optax.apply_updates``, params and
state donated) on a fixed gradient pytree, for bare AdamW, for each
clipping transform chained before it and for `optax_zclip.skip_spikes`
around each (given a constant loss, so it never skips). The variants run
in alternating rounds (the order rotates every round) so that the
machine's drift cancels; each round yields the ratio of every variant to
``optax.clip_by_global_norm+adamw``, to bare ``adamw`` and to
``clip_by_global_norm+adamw`` (this package's: global-norm clipping reduced
to a float32 norm and a scalar factor folded into AdamW, the floor of any
clipping by a global norm). The table reports the median ratio over rounds
with its min and max, the median time per step and the compile time.

  python benchmarks/step_overhead.py                   # 16M params, 32 leaves
  python benchmarks/step_overhead.py --tree llama      # LLaMA-shaped tree
  python benchmarks/step_overhead.py --dtype bfloat16  # bf16 params, grads
  python benchmarks/step_overhead.py --devices 8       # sharded jit, 8 devices
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import jax

if __name__ == "__main__":
  _pre = argparse.ArgumentParser(add_help=False)
  _pre.add_argument("--devices", type=int, default=0)
  _n = _pre.parse_known_args()[0].devices
  if _n:
    jax.config.update("jax_num_cpu_devices", _n)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import variants  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

# Every shared chain; those that take the loss (`skip_spikes`) get a
# constant one, so that they never skip.
VARIANTS = variants.table(1e-4)
BASE, BARE, FLOOR = ("optax.clip_by_global_norm+adamw", "adamw",
                     "clip_by_global_norm+adamw")


def flat_tree(n_params: int, n_leaves: int) -> dict[str, tuple[int, ...]]:
  """``n_leaves`` matrices of about ``n_params / n_leaves`` entries each."""
  per = max(1, n_params // n_leaves)
  cols = 1024 if per >= 1024 else per
  return {f"w{i:03d}": (max(1, per // cols), cols) for i in range(n_leaves)}


def llama_tree(d: int = 512, layers: int = 8, vocab: int = 32000,
               ffn: int = 1376) -> dict[str, tuple[int, ...]]:
  """Parameter shapes of a LLaMA-style decoder: 58M, 33M of them embeddings."""
  shapes = {"embed": (vocab, d), "final_norm": (d,), "head": (d, vocab)}
  for i in range(layers):
    for name, shape in {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d),
                        "gate": (d, ffn), "up": (d, ffn), "down": (ffn, d),
                        "attn_norm": (d,), "mlp_norm": (d,)}.items():
      shapes[f"layer{i:02d}.{name}"] = shape
  return shapes


def make_step(tx: optax.GradientTransformation, takes_value: bool):
  def step(params, state, grads, value):
    extra = {"value": value} if takes_value else {}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--params", type=float, default=16e6)
  p.add_argument("--leaves", type=int, default=32)
  p.add_argument("--tree", choices=["flat", "llama"], default="flat")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--devices", type=int, default=0,
                 help="simulated CPU devices; leaves sharded over them (FSDP)")
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--iters", type=int, default=10, help="steps per round")
  p.add_argument("--variants", default=",".join(VARIANTS))
  args = p.parse_args(argv)
  names = [v for v in args.variants.split(",") if v]
  for required in (FLOOR, BASE, BARE):
    if required not in names:
      names.insert(0, required)

  shapes = (llama_tree() if args.tree == "llama"
            else flat_tree(int(args.params), args.leaves))
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  host_grads = {k: (rng.standard_normal(s) * 1e-2).astype(dtype)
                for k, s in shapes.items()}
  n_params = sum(int(np.prod(s)) for s in shapes.values())

  sharding = replicated = None
  if args.devices:
    mesh = Mesh(np.asarray(jax.devices()), ("fsdp",))
    n = mesh.shape["fsdp"]
    sharding = {k: NamedSharding(mesh, P("fsdp") if s[0] % n == 0 else P())
                for k, s in shapes.items()}
    replicated = NamedSharding(mesh, P())

  def put(tree):
    return jax.device_put(tree, sharding) if sharding else jax.device_put(tree)

  grads = put(host_grads)
  value = jax.device_put(np.float32(2.0), replicated)
  runs, compile_s = {}, {}
  for name in names:
    make, takes_value = VARIANTS[name]
    tx = make()
    params = put({k: np.zeros(s, dtype) for k, s in shapes.items()})
    state = jax.jit(tx.init)(params)
    step = make_step(tx, takes_value)
    t0 = time.perf_counter()
    compiled = step.lower(params, state, grads, value).compile()
    compile_s[name] = time.perf_counter() - t0
    params, state = compiled(params, state, grads, value)  # warm up
    jax.block_until_ready(params)
    runs[name] = [compiled, params, state]

  per_step = {n: [] for n in names}
  with jax.transfer_guard("disallow"):  # no host sync inside any step
    for r in range(args.rounds):
      order = names[r % len(names):] + names[:r % len(names)]
      for name in order:
        compiled, params, state = runs[name]
        t0 = time.perf_counter()
        for _ in range(args.iters):
          params, state = compiled(params, state, grads, value)
        jax.block_until_ready(params)
        per_step[name].append((time.perf_counter() - t0) / args.iters)
        runs[name][1:] = [params, state]

  def ratio(name, base):
    rs = [a / b for a, b in zip(per_step[name], per_step[base],
                                    strict=True)]
    return statistics.median(rs), min(rs), max(rs)

  dev = jax.devices()[0]
  print(f"# step overhead: {n_params / 1e6:.1f}M {args.dtype} params in "
        f"{len(shapes)} leaves ({args.tree}), {jax.device_count()} "
        f"{dev.platform} device(s){' sharded (FSDP)' if sharding else ''}; "
        f"{args.rounds} rounds x {args.iters} steps; "
        f"{platform.processor() or platform.machine()}, "
        f"jax {jax.__version__}, optax {optax.__version__}, "
        f"{datetime.date.today()}")
  print()
  print(f"| variant | ms/step (median) | vs {BASE} (median [min, max]) "
        f"| vs {BARE} (median [min, max]) | vs {FLOOR} (median [min, max]) "
        f"| compile s |")
  print("|---|---|---|---|---|---|")
  for name in names:
    ms = 1e3 * statistics.median(per_step[name])
    rb, rb_lo, rb_hi = ratio(name, BASE)
    cols = " | ".join("{:.3f} [{:.3f}, {:.3f}]".format(*ratio(name, b))
                      for b in (BASE, BARE, FLOOR))
    print(f"| {name} | {ms:.2f} | {cols} | {compile_s[name]:.2f} |")


if __name__ == "__main__":
  main()
