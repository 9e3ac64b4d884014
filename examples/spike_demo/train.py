"""The demo's training loop: one run and seed, clean and with bad batches.

`run_seed` trains the model of `model.py` on the batches of `data.py` with
``optax.chain(<clipping>, adamw(schedule))`` under `train_step`, one
`nnx.jit` step for every method, which donates model and optimizer and
returns the losses and the clipping transform's telemetry
(`optax_zclip.stats`); each row of the metrics is derived from that
telemetry on the host. From the first injected step on it trains two
continuations of the same prefix: one on the clean batches, one with the
outlier batches of `data.outlier_batch` at the injected steps. Every
``ckpt_every`` steps each saves model, optimizer state (the clipping state
included) and the metrics so far, so that ``resume=True`` continues exactly
where a run stopped.
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
from data import Corpus, outlier_batch
from model import Llama, LlamaConfig, next_token_loss


def make_clipper(run: str, cfg: DemoConfig) -> optax.GradientTransformation:
  """The clipping transform of run ``run``, as the demo configures it."""
  if run == "none":
    # Measures and logs the norm without clipping, so that the baseline
    # reports through the same telemetry as every other method.
    return optax_zclip.clip_by_global_norm(None)
  if run.startswith("clip@"):
    return optax_zclip.clip_by_global_norm(float(run.removeprefix("clip@")))
  if run in ("zclip", "zclip+skip"):
    # The reference defaults, with its absolute cap off: the comparison is
    # adaptive against fixed clipping, not both together.
    return optax_zclip.zclip(alpha=cfg.zclip_alpha, z_thresh=cfg.zclip_z_thresh,
                             warmup_steps=cfg.zclip_warmup_steps,
                             max_grad_norm=None)
  if run == "adagc":
    return optax_zclip.adagc(warmup_steps=cfg.adagc_warmup_steps,
                             max_grad_norm=cfg.clip_norm)
  if run == "autoclip":
    return optax_zclip.autoclip(percentile=cfg.autoclip_percentile)
  raise ValueError(f"unknown run {run!r}")


def lr_schedule(cfg: DemoConfig) -> optax.Schedule:
  """Linear warm-up to ``lr``, cosine decay to ``min_lr_ratio * lr``."""
  warmup = cfg.lr_warmup_steps
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
      cfg.min_lr_ratio * cfg.lr)


_TX_CACHE: dict = {}


def make_tx(run: str, cfg: DemoConfig) -> optax.GradientTransformation:
  """``chain(<clipping>, adamw)``; ``zclip+skip`` wraps it in skip_spikes.

  One object per ``(run, cfg)``: the transform is static in the optimizer's
  graph, so reusing it lets every seed and branch of a run share one
  compiled train step instead of compiling its own.
  """
  key = (run, cfg)
  if key not in _TX_CACHE:
    tx = optax.chain(
        make_clipper(run, cfg),
        optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps,
                    weight_decay=cfg.weight_decay))
    if run == "zclip+skip":
      tx = optax_zclip.skip_spikes(tx, window=cfg.skip_window,
                                   sigma=cfg.skip_sigma)
    _TX_CACHE[key] = tx
  return _TX_CACHE[key]


def make_model(cfg: DemoConfig, seed: int | None = None) -> Llama:
  """The model of ``seed`` (default ``cfg.seed``), freshly initialised."""
  return Llama(LlamaConfig(d_model=cfg.d_model, n_layers=cfg.n_layers,
                           n_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim,
                           max_len=cfg.seq_len),
               rngs=nnx.Rngs(cfg.seed if seed is None else seed))


def copy_of(node: nnx.Module) -> nnx.Module:
  """A copy of a model or optimizer that shares no buffer with it.

  `nnx.clone` alone copies the variables but not their arrays, and the
  train step donates (frees) the arrays it is given: a branch made that way
  would delete the other's parameters.
  """
  graphdef, state = nnx.split(node)
  state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
  return nnx.clone(nnx.merge(graphdef, state))


# Model and optimizer are donated: their buffers are updated in place, as
# real trainers do, so anything read from them afterwards must come from the
# step's outputs (or from the objects, which nnx.jit points at the new
# buffers), never from arrays taken out of them before the step.
@nnx.jit(donate_argnums=(0, 1))
def train_step(model: Llama, optimizer: nnx.Optimizer, batch: jax.Array,
               probe: jax.Array, loss_scale: jax.Array) -> dict[str, Any]:
  """One step of any method: ``{"loss", "probe_loss", "stats"}``.

  The gradient is that of ``loss_scale`` times the loss; ``loss`` is the
  unscaled one, comparable across scales. ``probe_loss`` is the loss of the
  fixed held-out ``probe`` batch under the parameters the step starts from,
  the same point as ``loss``. ``stats`` is what the clipping transform
  logged (`optax_zclip.stats`): the gradient norm is read from there, never
  measured again here (on XLA:CPU a second norm of the gradients shares
  AdamW's squares and triples the step's cost). The scaled loss goes to the
  optimizer as ``value`` (`optax_zclip.skip_spikes` tests it; the other
  transforms ignore it).
  """
  def loss_fn(m):
    loss = next_token_loss(m, batch)
    return loss_scale * loss, loss

  (scaled, loss), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  probe_loss = next_token_loss(model, probe)
  optimizer.update(model, grads, value=scaled)
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


# The kind of each method's clipping state: `optax_zclip.stats` reports its
# fields as ``<kind>/<field>`` (``clip/grad_norm``, ``zclip/spike_count``),
# and zclip+skip adds `skip_spikes`'s as ``skip/<field>``.
STATS_KIND = {"none": "clip", "clip": "clip", "zclip": "zclip",
              "zclip+skip": "zclip", "adagc": "adagc", "autoclip": "autoclip"}


def stats_kind(run: str) -> str:
  """The kind of run ``run``'s clipping state in `optax_zclip.stats`."""
  return STATS_KIND[run.split("@")[0]]


def grad_norm_of(s: dict, kind: str) -> Any:
  """The norm before clipping: the skip test's where the run has one (on a
  skipped step ZClip's is the previous step's), else the transform's."""
  return s.get("skip/grad_norm", s[f"{kind}/grad_norm"])


def host_rows(metrics: list[dict], start: int, lr: optax.Schedule,
              before: dict, kind: str) -> tuple[list[dict], dict]:
  """Host rows of consecutive steps' metrics, JSON-ready (NaN, Inf -> None).

  The one place where the telemetry's keys become the columns of
  metrics.jsonl, which are the same for every method. Every field comes
  from the step's loss and its clipping telemetry (`optax_zclip.stats`,
  read by its keys ``<kind>/<field>``): ``grad_norm`` from `grad_norm_of`,
  ``clipped_norm`` and ``threshold`` from the transform's fields, a
  threshold only where the transform has one global threshold (AdaGC has
  one per tensor, no clipping an infinite one), ``detected`` where it
  counts spikes (``zclip/spike_count`` went up during the step),
  ``tensors_clipped`` where it counts clipped tensors
  (``adagc/num_clipped``), ``skipped`` where steps can be skipped
  (``skip/skipped``, zclip+skip; a skipped step's ``clipped_norm`` is 0,
  since nothing reached AdamW, and ZClip's statistics were left as they
  were).

  Args:
    metrics: `train_step` outputs of steps ``start, start + 1, ...``.
    start: the step of ``metrics[0]``.
    lr: the learning-rate schedule, logged per step.
    before: the telemetry (on the host) of the optimizer state the first of
      these steps started from.
    kind: the kind of the run's clipping state (`stats_kind`).

  Returns:
    The rows, and the telemetry of the last step (``before`` of the next
    call).
  """
  host = jax.device_get(metrics)
  spikes, tensors = f"{kind}/spike_count", f"{kind}/num_clipped"
  rows = []
  for i, m in enumerate(host):
    s = m["stats"]
    row = {"step": start + i, "lr": float(lr(start + i)), "loss": m["loss"],
           "probe_loss": m["probe_loss"], "grad_norm": grad_norm_of(s, kind),
           "clipped_norm": s[f"{kind}/clipped_norm"],
           "threshold": s.get(f"{kind}/threshold", np.float32(np.nan))}
    if spikes in s:
      row["detected"] = bool(s[spikes] > before[spikes])
    if tensors in s:
      row["tensors_clipped"] = s[tensors]
    if "skip/skipped" in s:
      row["skipped"] = bool(s["skip/skipped"])
      if row["skipped"]:
        row["clipped_norm"] = np.float32(0.0)
    row = {k: _json_scalar(v) for k, v in row.items()}
    row["clipped"] = bool(row["clipped_norm"] < row["grad_norm"] * (1 - 1e-6))
    rows.append(row)
    before = s
  return rows, before


class Track(NamedTuple):
  """One continuation of a run: its rows (one per step) and held-out loss."""

  rows: list[dict]
  eval_loss: float


class SeedResult(NamedTuple):
  """One run and seed: the clean and the injected continuation.

  Both share the rows before the first injection (trained once); each holds
  every step's row from step 0.
  """

  clean: Track
  injected: Track
  timed_steps: int
  timed_seconds: float


class _Trainer:
  """Trains spans of steps of one model and optimizer, with checkpoints."""

  def __init__(self, cfg: DemoConfig, corpus: Corpus, seed: int,
               probe: jax.Array, progress: Any, kind: str):
    self.cfg, self.corpus, self.seed, self.kind = cfg, corpus, seed, kind
    self.probe, self.progress = probe, progress
    self.schedule = lr_schedule(cfg)
    self.scale = jnp.float32(cfg.loss_scale)
    self.timed_steps, self.timed_seconds = 0, 0.0

  def batch(self, step: int, inject: bool) -> jax.Array:
    cfg = self.cfg
    if inject and step in cfg.inject:
      b = outlier_batch(cfg.inject_kind, step, cfg.batch_size, cfg.seq_len,
                        self.corpus)
    else:
      b = self.corpus.batch(self.seed, step, cfg.batch_size, cfg.seq_len)
    return jnp.asarray(b)

  def span(self, model, optimizer, start: int, stop: int, *, inject: bool,
           mngr: ocp.CheckpointManager | None, rows: list[dict],
           rows_path: pathlib.Path) -> list[dict]:
    """Steps ``[start, stop)``; returns ``rows`` with theirs appended.

    Rows and a checkpoint are written every ``ckpt_every`` steps and at
    ``stop``.
    """
    cfg = self.cfg
    # The telemetry the first step starts from (the restored one on
    # resume): the spike flag of a step is its spike count against the
    # previous one.
    before = jax.device_get(optax_zclip.stats(optimizer))
    pending, pending_start, t0 = [], start, None
    for step in range(start, stop):
      pending.append(train_step(model, optimizer, self.batch(step, inject),
                                self.probe, self.scale))
      if t0 is None:  # time from after the first (maybe compiling) step
        jax.block_until_ready(pending[-1])
        t0, timed_from = time.perf_counter(), step + 1
      done = step + 1
      if self.progress is not None:
        self.progress.update(1)
        if done % 25 == 0 or done == stop:
          last = jax.device_get(pending[-1])
          self.progress.set_postfix(
              seed=self.seed, branch="injected" if inject else "clean",
              loss=f"{last['loss']:.3f}",
              grad_norm=f"{grad_norm_of(last['stats'], self.kind):.2f}")
      ckpt = mngr is not None and cfg.ckpt_every and done % cfg.ckpt_every == 0
      if done == stop or ckpt:
        new_rows, before = host_rows(pending, pending_start, self.schedule,
                                     before, self.kind)
        rows = rows + new_rows
        pending, pending_start = [], done
        with open(rows_path, "w") as f:
          f.writelines(json.dumps(r) + "\n" for r in rows)
        if mngr is not None and cfg.ckpt_every:
          save(mngr, done, model, optimizer)
    if t0 is not None:
      self.timed_steps += stop - timed_from
      self.timed_seconds += time.perf_counter() - t0
    return rows


def save(mngr: ocp.CheckpointManager, step: int, model, optimizer) -> None:
  mngr.save(step, args=ocp.args.StandardSave(
      _checkpoint_target(model, optimizer)))
  # The next step donates these buffers: the save must have read them
  # before then, so it is not left running in the background.
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, model, optimizer) -> None:
  restored = mngr.restore(step, args=ocp.args.StandardRestore(
      _checkpoint_target(model, optimizer)))
  nnx.update(model, restored["model"])
  nnx.update(optimizer, restored["optimizer"])


def read_rows(path: pathlib.Path, first: int, stop: int) -> list[dict]:
  """The rows of steps ``[first, stop)`` saved in ``path``."""
  with open(path) as f:
    rows = [r for r in map(json.loads, f) if r["step"] < stop]
  if [r["step"] for r in rows] != list(range(first, stop)):
    raise RuntimeError(f"{path} does not hold the rows of steps {first} to "
                       f"{stop - 1} that its checkpoint needs")
  return rows


def has_checkpoint(run_dir: pathlib.Path) -> bool:
  """Whether ``run_dir`` (a run, or the whole output) holds a checkpoint."""
  return any(p.name.isdigit() for p in run_dir.rglob("checkpoints/*"))


def run_seed(run: str, cfg: DemoConfig, corpus: Corpus, seed: int,
             seed_dir: pathlib.Path, *, resume: bool = False,
             progress: Any = None) -> SeedResult:
  """Trains one run and seed: a shared prefix, then two continuations.

  Steps before the first injection are trained once; the model and
  optimizer are then copied, and the copy continues on the clean batches
  (the noise floor of damage and recovery) while the original continues
  with the outlier batches at ``cfg.inject``. Each continuation checkpoints
  to its own folder under ``seed_dir`` (``clean/``, ``injected/``); the
  branch point is saved in ``branch/``, so that ``resume=True`` continues
  either one exactly where it stopped. ``progress`` is an optional
  tqdm-like bar advanced once per step.
  """
  branch_at, steps = cfg.inject[0], cfg.steps
  if not resume and seed_dir.exists():
    shutil.rmtree(seed_dir)
  keep = cfg.ckpt_every > 0
  mngrs = {}
  for name in ("clean", "injected", "branch"):
    (seed_dir / name).mkdir(parents=True, exist_ok=True)
    mngrs[name] = ocp.CheckpointManager(
        (seed_dir / name / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2 if keep else 1))
  probe = jnp.asarray(corpus.eval_batches(cfg.probe_size, cfg.seq_len, 1)[0])
  trainer = _Trainer(cfg, corpus, seed, probe, progress, stats_kind(run))
  tx = make_tx(run, cfg)

  def fresh():
    model = make_model(cfg, seed)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  # The clean continuation, whose first steps are the shared prefix.
  model, opt = fresh()
  clean_path = seed_dir / "clean" / "metrics.jsonl"
  start, rows = 0, []
  latest = mngrs["clean"].latest_step() if resume else None
  if latest is not None:
    start = latest
    restore(mngrs["clean"], start, model, opt)
    rows = read_rows(clean_path, 0, start)
  if progress is not None:
    progress.update(start)
  branch = None
  if start <= branch_at:
    rows = trainer.span(model, opt, start, branch_at, inject=False,
                        mngr=mngrs["clean"], rows=rows, rows_path=clean_path)
    branch = copy_of(model), copy_of(opt)
    # A resumed run that retrained the prefix finds the branch point saved
    # already, and the same: the steps are deterministic.
    if keep and mngrs["branch"].latest_step() != branch_at:
      save(mngrs["branch"], branch_at, model, opt)
  clean_rows = trainer.span(model, opt, max(start, branch_at), steps,
                            inject=False, mngr=mngrs["clean"], rows=rows,
                            rows_path=clean_path)
  clean = Track(clean_rows, held_out_loss(model, cfg, corpus))

  # The injected continuation, from the branch point or its checkpoint.
  inj_path = seed_dir / "injected" / "metrics.jsonl"
  latest = mngrs["injected"].latest_step() if resume else None
  if latest is not None:
    model, opt = fresh()
    restore(mngrs["injected"], latest, model, opt)
    start, rows = latest, read_rows(inj_path, branch_at, latest)
  elif branch is not None:
    model, opt = branch
    start, rows = branch_at, []
  else:  # resumed past the branch point: it was saved
    model, opt = fresh()
    restore(mngrs["branch"], branch_at, model, opt)
    start, rows = branch_at, []
  if progress is not None:
    progress.update(start - branch_at)
  rows = trainer.span(model, opt, start, steps, inject=True,
                      mngr=mngrs["injected"], rows=rows, rows_path=inj_path)
  injected = Track(clean_rows[:branch_at] + rows,
                   held_out_loss(model, cfg, corpus))
  for m in mngrs.values():
    m.wait_until_finished()
    m.close()
  return SeedResult(clean, injected, trainer.timed_steps,
                    trainer.timed_seconds)


def held_out_loss(model, cfg: DemoConfig, corpus: Corpus) -> float:
  """Mean loss over the ``eval_batches`` held-out batches."""
  return float(np.mean([
      float(eval_loss(model, jnp.asarray(b)))
      for b in corpus.eval_batches(cfg.batch_size, cfg.seq_len,
                                   cfg.eval_batches)]))
