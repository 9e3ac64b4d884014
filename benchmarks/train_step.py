"""What clipping costs in a whole training step, measured side by side.

`benchmarks/step_overhead.py` times the optimizer step alone. A user pays
for something else: the whole jitted training step of the model they train
(forward, backward, clipping, AdamW) and the time to compile it. This script
builds the spike demo's LLaMA-style Flax NNX model (``examples/spike_demo/
model.py``) at one or more sizes and, for each size, one ``nnx.jit`` train
step per variant, donating model and optimizer as real trainers do and
returning the loss and `optax_zclip.stats` of the optimizer, as a user would
log them. The variants run in alternating rounds (the order rotates every
round) so that the machine's drift cancels; each round yields the overhead
of every variant over bare AdamW in percent of the whole step. The table
reports its median over rounds with min and max, the median time per step
and the compile time of each step (trace, lower and compile from empty
caches, median of a few alternating repetitions).

  python benchmarks/train_step.py                  # demo and 23M sizes
  python benchmarks/train_step.py --sizes 23m,demo --rounds 20 --iters 1
  python benchmarks/train_step.py --sizes demo --variants adamw,zclip+adamw
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import variants
from flax import nnx

import optax_zclip

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "examples" / "spike_demo"))

from model import Llama, LlamaConfig, next_token_loss, num_params  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Size:
  """A model size and the batch it trains on."""

  model: LlamaConfig
  batch: int
  seq_len: int


SIZES = {
    # The spike demo's model and batch (examples/spike_demo/config.py).
    "demo": Size(LlamaConfig(d_model=64, n_layers=4, n_heads=2, ffn_dim=192,
                             max_len=64), batch=16, seq_len=64),
    # 23M parameters: 6 blocks of width 512 (19M) and a 4k vocabulary with
    # an untied head, on a batch of 8 x 128 tokens, as in the issue.
    "23m": Size(LlamaConfig(vocab_size=4096, d_model=512, n_layers=6,
                            n_heads=8, ffn_dim=1376, max_len=128,
                            tie_embeddings=False), batch=8, seq_len=128),
    # A few thousand parameters: for the test of this script.
    "tiny": Size(LlamaConfig(vocab_size=64, d_model=16, n_layers=1,
                             n_heads=2, ffn_dim=32, max_len=16),
                 batch=2, seq_len=16),
}


VARIANTS = variants.table(1e-4)
BARE = "adamw"


def make_step(with_value: bool):
  """A fresh ``nnx.jit`` train step (its own compilation cache).

  Model and optimizer are donated; the step returns the loss and the
  optimizer's clipping telemetry, as a training loop would log them.
  """

  @nnx.jit(donate_argnums=(0, 1))
  def step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(next_token_loss)(model, batch)
    if with_value:
      optimizer.update(model, grads, value=loss)
    else:
      optimizer.update(model, grads)
    return {"loss": loss, "stats": optax_zclip.stats(optimizer)}

  return step


def build(size: Size, name: str):
  """Model, optimizer and train step of variant ``name`` at ``size``."""
  make_tx, with_value = VARIANTS[name]
  model = Llama(size.model, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
  return model, optimizer, make_step(with_value)


def measure(size: Size, names: list[str], rounds: int, iters: int,
            compile_reps: int):
  """Per-step seconds of each variant in each round, and compile seconds.

  The compile time of a step is the median over ``compile_reps`` alternating
  repetitions of tracing, lowering and compiling it (``step.lower(...)
  .compile()`` after `jax.clear_caches`), so that it is measured under the
  same load for every variant.
  """
  rng = np.random.default_rng(0)
  # One fixed batch: the step's cost does not depend on the tokens.
  batch = jnp.asarray(rng.integers(0, size.model.vocab_size,
                                   (size.batch, size.seq_len + 1)), jnp.int32)
  runs = {name: build(size, name) for name in names}
  compile_times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(compile_reps):
    for name in names[r % len(names):] + names[:r % len(names)]:
      model, optimizer, step = runs[name]
      # JAX caches traces and executables in memory: start from nothing,
      # as a new training run does.
      jax.clear_caches()
      t0 = time.perf_counter()
      step.lower(model, optimizer, batch).compile()
      compile_times[name].append(time.perf_counter() - t0)
  for name in names:  # warm up: the first call compiles once more
    model, optimizer, step = runs[name]
    jax.block_until_ready(step(model, optimizer, batch))

  per_step: dict[str, list[float]] = {n: [] for n in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      model, optimizer, step = runs[name]
      t0 = time.perf_counter()
      for _ in range(iters):
        out = step(model, optimizer, batch)
      jax.block_until_ready(out)
      per_step[name].append((time.perf_counter() - t0) / iters)
  compile_s = {n: statistics.median(t) for n, t in compile_times.items()}
  params = num_params(runs[names[0]][0])
  return per_step, compile_s, params


def overhead(per_step: dict[str, list[float]], name: str,
             base: str = BARE) -> tuple[float, float, float]:
  """Median, min and max over rounds of ``name``'s overhead in percent."""
  pct = [100.0 * (a / b - 1.0)
         for a, b in zip(per_step[name], per_step[base], strict=True)]
  return statistics.median(pct), min(pct), max(pct)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="demo,23m",
                 help=f"comma-separated, from {', '.join(SIZES)}")
  p.add_argument("--rounds", type=int, default=16)
  p.add_argument("--iters", type=int, default=3, help="steps per round")
  p.add_argument("--compile-reps", type=int, default=3,
                 help="alternating compilations of each step (median)")
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help=f"comma-separated, from {', '.join(VARIANTS)}")
  args = p.parse_args(argv)
  names = [v for v in args.variants.split(",") if v]
  unknown = [n for n in names if n not in VARIANTS]
  sizes = [s for s in args.sizes.split(",") if s]
  unknown += [s for s in sizes if s not in SIZES]
  if unknown:
    p.error(f"unknown variants or sizes: {unknown}")
  if min(args.rounds, args.iters, args.compile_reps) < 1:
    p.error("--rounds, --iters and --compile-reps must be >= 1")
  if BARE not in names:
    names.insert(0, BARE)

  print(f"# train-step overhead over bare {BARE}: {args.rounds} rounds x "
        f"{args.iters} steps; {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), "
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"optax {optax.__version__}, {datetime.date.today()}")
  for size_name in sizes:
    size = SIZES[size_name]
    per_step, compile_s, params = measure(size, names, args.rounds,
                                          args.iters, args.compile_reps)
    print()
    print(f"## {size_name}: {params / 1e6:.2f}M params, batch "
          f"{size.batch}x{size.seq_len}")
    print()
    print(f"| variant | ms/step (median) | overhead vs {BARE} % "
          "(median [min, max]) | compile s |")
    print("|---|---|---|---|")
    for name in names:
      ms = 1e3 * statistics.median(per_step[name])
      med, lo, hi = overhead(per_step, name)
      print(f"| {name} | {ms:.2f} | {med:+.2f} [{lo:+.2f}, {hi:+.2f}] | "
            f"{compile_s[name]:.2f} |")


if __name__ == "__main__":
  main()
