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
  cores in a minute or two per method.
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
  # Loss-spike metric (see optax_zclip.spike_mask), applied to the loss of a
  # fixed held-out probe batch of ``probe_size`` sequences measured every
  # step: unlike the training loss it has no batch-to-batch noise, so a
  # spike that builds up over a few steps stands out.
  probe_size: int = 4
  spike_window: int = 50
  spike_sigma: float = 5.0
  # Evaluation and checkpoints.
  eval_batches: int = 8
  ckpt_every: int = 250
  final_loss_steps: int = 50  # "final loss" is the mean over these steps

  @property
  def ffn_dim(self) -> int:
    return (self.d_model * 8 // 3 + 31) // 32 * 32


# The settings the command line exposes, as ``--d-model`` for ``d_model``.
CLI_FIELDS = {
    "steps": None, "lr": "peak learning rate",
    "seed": "model init and batch order", "d_model": None, "n_layers": None,
    "n_heads": None, "seq_len": None, "batch_size": None, "b2": None,
    "warmup_frac": None, "weight_decay": None, "clip_norm": None,
    "zclip_z_thresh": None, "probe_size": "held-out sequences whose loss is "
    "measured every step (loss spikes are counted on it)",
    "spike_window": None, "spike_sigma": None,
    "ckpt_every": "steps between Orbax checkpoints (0: none)",
}


def parse_args(argv: list[str] | None = None) -> tuple[DemoConfig, dict]:
  """``(config, options)``: options are ``out``, ``resume``, ``corpus``."""
  d = DemoConfig()
  p = argparse.ArgumentParser(
      description="Train one small LLaMA-style model under several gradient "
      "clipping methods at a high learning rate; write metrics, plots and "
      "a summary.")
  for field, help_text in CLI_FIELDS.items():
    default = getattr(d, field)
    p.add_argument("--" + field.replace("_", "-"), type=type(default),
                   default=default, help=help_text)
  p.add_argument("--methods", default=",".join(d.methods),
                 help=f"comma-separated, from {', '.join(METHODS)}")
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
  if a.probe_size < 1:
    p.error("--probe-size must be >= 1")
  cfg = dataclasses.replace(
      d, methods=methods, **{f: getattr(a, f) for f in CLI_FIELDS})
  return cfg, {"out": a.out, "resume": a.resume, "corpus": a.corpus}
