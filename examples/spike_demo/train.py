"""The demo's training loop: one method, with telemetry and Orbax checkpoints.

`run_method` trains the model of `model.py` on the batches of `data.py` with
``optax.chain(<clipping>, adamw(schedule))`` under one `nnx.jit` step that
returns the loss and the clipping telemetry, and saves model, optimizer state
(the clipping state included) and the metrics so far every ``ckpt_every``
steps, so that ``resume=True`` continues exactly where a run stopped.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import optax_zclip
from config import DemoConfig
from data import Corpus
from model import Llama, LlamaConfig, next_token_loss


def make_clipper(method: str, cfg: DemoConfig) -> optax.GradientTransformation:
  """The clipping transform of ``method``, as the demo configures it."""
  if method == "none":
    return optax.identity()
  if method == "clip":
    return optax.clip_by_global_norm(cfg.clip_norm)
  if method == "zclip":
    # The reference defaults, with its absolute cap off: the comparison is
    # adaptive against fixed clipping, not both together.
    return optax_zclip.zclip(alpha=cfg.zclip_alpha, z_thresh=cfg.zclip_z_thresh,
                             warmup_steps=cfg.zclip_warmup_steps,
                             max_grad_norm=None)
  if method == "adagc":
    return optax_zclip.adagc(warmup_steps=cfg.adagc_warmup_steps,
                             max_grad_norm=cfg.clip_norm)
  if method == "autoclip":
    return optax_zclip.autoclip(percentile=cfg.autoclip_percentile)
  raise ValueError(f"unknown method {method!r}")


def lr_schedule(cfg: DemoConfig) -> optax.Schedule:
  """Linear warm-up to ``lr``, cosine decay to ``min_lr_ratio * lr``."""
  warmup = max(1, int(cfg.warmup_frac * cfg.steps))
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
      cfg.min_lr_ratio * cfg.lr)


def make_tx(method: str, cfg: DemoConfig) -> optax.GradientTransformation:
  return optax.chain(
      make_clipper(method, cfg),
      optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps,
                  weight_decay=cfg.weight_decay))


def make_model(cfg: DemoConfig) -> Llama:
  return Llama(LlamaConfig(d_model=cfg.d_model, n_layers=cfg.n_layers,
                           n_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim,
                           max_len=cfg.seq_len), rngs=nnx.Rngs(cfg.seed))


def make_train_step(method: str, cfg: DemoConfig) -> Callable:
  """``step(model, optimizer, batch, probe) -> metrics``, one `nnx.jit` call.

  ``probe_loss`` is the loss of the fixed held-out ``probe`` batch under the
  parameters the step starts from, the same point as ``loss``.

  The package's transforms report their norms and threshold in their state
  (`optax_zclip.stats`); for the two baselines the step measures the
  gradient norm itself, once, and derives the rest.
  """

  @nnx.jit
  def train_step(model, optimizer, batch, probe):
    loss, grads = nnx.value_and_grad(next_token_loss)(model, batch)
    probe_loss = next_token_loss(model, probe)
    if method == "zclip":  # read before the update changes it in place
      spikes_before = optax_zclip.stats(optimizer.opt_state[0])["spike_count"]
    optimizer.update(model, grads)
    metrics = {"loss": loss, "probe_loss": probe_loss}
    if method in ("none", "clip"):
      g = optax.tree.norm(grads).astype(jnp.float32)
      metrics["grad_norm"] = g
      if method == "none":
        metrics["clipped_norm"], metrics["threshold"] = g, jnp.float32(jnp.nan)
      else:  # what optax.clip_by_global_norm lets through
        metrics["clipped_norm"] = jnp.minimum(g, cfg.clip_norm)
        metrics["threshold"] = jnp.float32(cfg.clip_norm)
      return metrics
    s = optax_zclip.stats(optimizer.opt_state[0])
    metrics["grad_norm"], metrics["clipped_norm"] = (s["grad_norm"],
                                                     s["clipped_norm"])
    # AdaGC has one threshold per tensor, none global.
    metrics["threshold"] = s.get("threshold", jnp.float32(jnp.nan))
    if method == "zclip":
      metrics["detected"] = s["spike_count"] > spikes_before
    if method == "adagc":
      metrics["tensors_clipped"] = s["num_clipped"]
    return metrics

  return train_step


@nnx.jit
def eval_loss(model, batch):
  return next_token_loss(model, batch)


def _checkpoint_target(model, optimizer) -> dict:
  return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}


def _rows(metrics: list[dict], start: int, lr: optax.Schedule) -> list[dict]:
  """Host rows of per-step metrics, JSON-ready (NaN -> None)."""
  host = jax.device_get(metrics)
  rows = []
  for i, m in enumerate(host):
    step = start + i
    row = {"step": step, "lr": float(lr(step))}
    for k, v in m.items():
      v = v.item()
      row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    row["clipped"] = bool(row["clipped_norm"] < row["grad_norm"] * (1 - 1e-6))
    rows.append(row)
  return rows


class RunResult(NamedTuple):
  rows: list[dict]  # one per step
  eval_loss: float
  steps_per_second: float


def run_method(method: str, cfg: DemoConfig, corpus: Corpus,
               run_dir: pathlib.Path, *, resume: bool = False,
               progress: Any = None) -> RunResult:
  """Trains one method; checkpoints to and resumes from ``run_dir``.

  ``progress`` is an optional tqdm-like bar advanced once per step.
  """
  model = make_model(cfg)
  optimizer = nnx.Optimizer(model, make_tx(method, cfg), wrt=nnx.Param)
  rows_path = run_dir / "metrics.jsonl"
  ckpt_dir = (run_dir / "checkpoints").absolute()
  if not resume and run_dir.exists():
    shutil.rmtree(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  mngr = ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2))

  start, rows = 0, []
  if resume and mngr.latest_step() is not None:
    start = mngr.latest_step()
    restored = mngr.restore(start, args=ocp.args.StandardRestore(
        _checkpoint_target(model, optimizer)))
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    with open(rows_path) as f:
      rows = [json.loads(line) for line in f][:start]
    if len(rows) != start:
      raise RuntimeError(f"{rows_path} has {len(rows)} rows, checkpoint is "
                         f"at step {start}")
  if progress is not None:
    progress.update(start)

  step_fn = make_train_step(method, cfg)
  probe = jnp.asarray(corpus.eval_batches(cfg.probe_size, cfg.seq_len, 1)[0])
  schedule = lr_schedule(cfg)
  pending, pending_start = [], start
  timed_from, t0 = None, None
  for step in range(start, cfg.steps):
    batch = jnp.asarray(corpus.batch(cfg.seed, step, cfg.batch_size,
                                     cfg.seq_len))
    pending.append(step_fn(model, optimizer, batch, probe))
    if timed_from is None:  # time from after the first (compiling) step
      jax.block_until_ready(pending[-1])
      timed_from, t0 = step + 1, time.perf_counter()
    done = step + 1
    if progress is not None:
      progress.update(1)
      if done % 25 == 0 or done == cfg.steps:
        last = jax.device_get(pending[-1])
        progress.set_postfix(loss=f"{last['loss']:.3f}",
                             grad_norm=f"{last['grad_norm']:.2f}")
    if done == cfg.steps or (cfg.ckpt_every and done % cfg.ckpt_every == 0):
      rows += _rows(pending, pending_start, schedule)
      pending, pending_start = [], done
      with open(rows_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
      if cfg.ckpt_every:
        mngr.save(done, args=ocp.args.StandardSave(
            _checkpoint_target(model, optimizer)))
  mngr.wait_until_finished()
  mngr.close()
  elapsed = (time.perf_counter() - t0) if t0 is not None else 0.0
  timed = cfg.steps - (timed_from or cfg.steps)
  sps = timed / elapsed if elapsed > 0 and timed > 0 else float("nan")

  losses = [float(eval_loss(model, jnp.asarray(b)))
            for b in corpus.eval_batches(cfg.batch_size, cfg.seq_len,
                                         cfg.eval_batches)]
  return RunResult(rows, float(np.mean(losses)), sps)
