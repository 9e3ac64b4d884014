"""The demo's training loop: one method, with telemetry and Orbax checkpoints.

`run_method` trains the model of `model.py` on the batches of `data.py` with
``optax.chain(<clipping>, adamw(schedule))`` under `train_step`, one
`nnx.jit` step for every method, which donates model and optimizer and
returns the losses and the clipping transform's telemetry
(`optax_zclip.stats`); each row of the metrics is derived from that
telemetry on the host. Every ``ckpt_every`` steps it saves model, optimizer
state (the clipping state included) and the metrics so far, so that
``resume=True`` continues exactly where a run stopped.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import time
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
    # Measures and logs the norm without clipping, so that the baseline
    # reports through the same telemetry as every other method.
    return optax_zclip.clip_by_global_norm(None)
  if method == "clip":
    return optax_zclip.clip_by_global_norm(cfg.clip_norm)
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


# Model and optimizer are donated: their buffers are updated in place, as
# real trainers do, so anything read from them afterwards must come from the
# step's outputs (or from the objects, which nnx.jit points at the new
# buffers), never from arrays taken out of them before the step.
@nnx.jit(donate_argnums=(0, 1))
def train_step(model: Llama, optimizer: nnx.Optimizer, batch: jax.Array,
               probe: jax.Array) -> dict[str, Any]:
  """One step of any method: ``{"loss", "probe_loss", "stats"}``.

  ``probe_loss`` is the loss of the fixed held-out ``probe`` batch under the
  parameters the step starts from, the same point as ``loss``. ``stats`` is
  what the clipping transform logged (`optax_zclip.stats`): the gradient
  norm is read from there, never measured again here (on XLA:CPU a second
  norm of the gradients shares AdamW's squares and triples the step's cost).
  """
  loss, grads = nnx.value_and_grad(next_token_loss)(model, batch)
  probe_loss = next_token_loss(model, probe)
  optimizer.update(model, grads)
  return {"loss": loss, "probe_loss": probe_loss,
          "stats": optax_zclip.stats(optimizer)}


@nnx.jit
def eval_loss(model, batch):
  return next_token_loss(model, batch)


def _checkpoint_target(model, optimizer) -> dict:
  return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}


def _json_scalar(v: Any) -> Any:
  v = v.item() if hasattr(v, "item") else v
  return None if isinstance(v, float) and not math.isfinite(v) else v


def host_rows(metrics: list[dict], start: int, lr: optax.Schedule,
              before: dict) -> tuple[list[dict], dict]:
  """Host rows of consecutive steps' metrics, JSON-ready (NaN, Inf -> None).

  Every field comes from the step's loss and its clipping telemetry, by the
  telemetry's keys, whatever the method: a threshold only where the
  transform has one global threshold (AdaGC has one per tensor, no clipping
  an infinite one), ``detected`` where it counts spikes (ZClip; the count
  went up during the step), ``tensors_clipped`` where it counts clipped
  tensors (AdaGC).

  Args:
    metrics: `train_step` outputs of steps ``start, start + 1, ...``.
    start: the step of ``metrics[0]``.
    lr: the learning-rate schedule, logged per step.
    before: the telemetry (on the host) of the optimizer state the first of
      these steps started from.

  Returns:
    The rows, and the telemetry of the last step (``before`` of the next
    call).
  """
  host = jax.device_get(metrics)
  rows = []
  for i, m in enumerate(host):
    s = m["stats"]
    row = {"step": start + i, "lr": float(lr(start + i)), "loss": m["loss"],
           "probe_loss": m["probe_loss"], "grad_norm": s["grad_norm"],
           "clipped_norm": s["clipped_norm"],
           "threshold": s.get("threshold", np.float32(np.nan))}
    if "spike_count" in s:
      row["detected"] = bool(s["spike_count"] > before["spike_count"])
    if "num_clipped" in s:
      row["tensors_clipped"] = s["num_clipped"]
    row = {k: _json_scalar(v) for k, v in row.items()}
    row["clipped"] = bool(row["clipped_norm"] < row["grad_norm"] * (1 - 1e-6))
    rows.append(row)
    before = s
  return rows, before


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

  # The telemetry the first step starts from (the restored one on resume):
  # the spike flag of a step is its spike count against the previous one.
  before = jax.device_get(optax_zclip.stats(optimizer))
  probe = jnp.asarray(corpus.eval_batches(cfg.probe_size, cfg.seq_len, 1)[0])
  schedule = lr_schedule(cfg)
  pending, pending_start = [], start
  timed_from, t0 = None, None
  for step in range(start, cfg.steps):
    batch = jnp.asarray(corpus.batch(cfg.seed, step, cfg.batch_size,
                                     cfg.seq_len))
    pending.append(train_step(model, optimizer, batch, probe))
    if timed_from is None:  # time from after the first (compiling) step
      jax.block_until_ready(pending[-1])
      timed_from, t0 = step + 1, time.perf_counter()
    done = step + 1
    if progress is not None:
      progress.update(1)
      if done % 25 == 0 or done == cfg.steps:
        last = jax.device_get(pending[-1])
        progress.set_postfix(loss=f"{last['loss']:.3f}",
                             grad_norm=f"{last['stats']['grad_norm']:.2f}")
    if done == cfg.steps or (cfg.ckpt_every and done % cfg.ckpt_every == 0):
      new_rows, before = host_rows(pending, pending_start, schedule, before)
      rows += new_rows
      pending, pending_start = [], done
      with open(rows_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
      if cfg.ckpt_every:
        mngr.save(done, args=ocp.args.StandardSave(
            _checkpoint_target(model, optimizer)))
        # The next step donates these buffers: the save must have read them
        # before then, so it is not left running in the background.
        mngr.wait_until_finished()
  mngr.wait_until_finished()
  mngr.close()
  elapsed = (time.perf_counter() - t0) if t0 is not None else 0.0
  timed = cfg.steps - (timed_from or cfg.steps)
  sps = timed / elapsed if elapsed > 0 and timed > 0 else float("nan")

  losses = [float(eval_loss(model, jnp.asarray(b)))
            for b in corpus.eval_batches(cfg.batch_size, cfg.seq_len,
                                         cfg.eval_batches)]
  return RunResult(rows, float(np.mean(losses)), sps)
