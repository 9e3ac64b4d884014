"""Settings of the spike demo: one frozen dataclass, filled from the CLI."""

from __future__ import annotations

import argparse
import dataclasses

METHODS = ("none", "clip", "zclip", "adagc", "autoclip")
DEFAULT_METHODS = ("none", "clip", "zclip", "adagc")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Everything that determines a run; saved in ``summary.json``.

  The optimizer follows the ZClip paper's Table 1 (AdamW with b1 0.9, b2
  0.999, eps 1e-7, weight decay 0.01; linear warm-up, then cosine decay to
  10% of the peak), scaled down to a byte-level model that trains on two CPU
  cores in about a minute per method.
  """

  # Run.
  steps: int = 1000
  lr: float = 1e-2
  seed: int = 0
  methods: tuple[str, ...] = DEFAULT_METHODS
  # Model.
  d_model: int = 64
  n_layers: int = 4
  n_heads: int = 2
  seq_len: int = 64
  batch_size: int = 16
  # Optimizer (paper's Table 1, scaled).
  warmup_frac: float = 0.05
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  adam_eps: float = 1e-7
  weight_decay: float = 0.01
  # Clipping methods.
  clip_norm: float = 1.0  # the fixed-threshold baseline
  zclip_alpha: float = 0.97
  zclip_z_thresh: float = 2.5
  zclip_warmup_steps: int = 25
  adagc_warmup_steps: int = 100
  autoclip_percentile: float = 10.0
  # Loss-spike metric (see optax_zclip.spike_mask).
  spike_window: int = 50
  spike_sigma: float = 5.0
  # Evaluation and checkpoints.
  eval_batches: int = 8
  ckpt_every: int = 250
  final_loss_steps: int = 50  # "final loss" is the mean over these steps

  @property
  def ffn_dim(self) -> int:
    return (self.d_model * 8 // 3 + 31) // 32 * 32


def parse_args(argv: list[str] | None = None) -> tuple[DemoConfig, dict]:
  """``(config, options)``: options are ``out``, ``resume``, ``corpus``."""
  d = DemoConfig()
  p = argparse.ArgumentParser(
      description="Train one small LLaMA-style model under several gradient "
      "clipping methods at a high learning rate; write metrics, plots and "
      "a summary.")
  p.add_argument("--steps", type=int, default=d.steps)
  p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
  p.add_argument("--seed", type=int, default=d.seed,
                 help="model init and batch order")
  p.add_argument("--methods", default=",".join(d.methods),
                 help=f"comma-separated, from {', '.join(METHODS)}")
  p.add_argument("--d-model", type=int, default=d.d_model)
  p.add_argument("--n-layers", type=int, default=d.n_layers)
  p.add_argument("--n-heads", type=int, default=d.n_heads)
  p.add_argument("--seq-len", type=int, default=d.seq_len)
  p.add_argument("--batch-size", type=int, default=d.batch_size)
  p.add_argument("--b2", type=float, default=d.b2)
  p.add_argument("--warmup-frac", type=float, default=d.warmup_frac)
  p.add_argument("--weight-decay", type=float, default=d.weight_decay)
  p.add_argument("--clip-norm", type=float, default=d.clip_norm)
  p.add_argument("--zclip-z-thresh", type=float, default=d.zclip_z_thresh)
  p.add_argument("--spike-window", type=int, default=d.spike_window)
  p.add_argument("--spike-sigma", type=float, default=d.spike_sigma)
  p.add_argument("--ckpt-every", type=int, default=d.ckpt_every,
                 help="steps between Orbax checkpoints (0: none)")
  p.add_argument("--out", default="runs/spike_demo", help="output directory")
  p.add_argument("--resume", action="store_true",
                 help="continue each method from its latest checkpoint in "
                 "--out")
  p.add_argument("--corpus", default=None,
                 help="a text file (optionally .gz) instead of the bundled "
                 "corpus")
  a = p.parse_args(argv)
  methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods:
    p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
  if a.steps < 1:
    p.error("--steps must be >= 1")
  cfg = dataclasses.replace(
      d, steps=a.steps, lr=a.lr, seed=a.seed, methods=methods,
      d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads,
      seq_len=a.seq_len, batch_size=a.batch_size, b2=a.b2,
      warmup_frac=a.warmup_frac, weight_decay=a.weight_decay,
      clip_norm=a.clip_norm, zclip_z_thresh=a.zclip_z_thresh,
      spike_window=a.spike_window, spike_sigma=a.spike_sigma,
      ckpt_every=a.ckpt_every)
  return cfg, {"out": a.out, "resume": a.resume, "corpus": a.corpus}
