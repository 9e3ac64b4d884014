"""Settings of the spike demo: one frozen dataclass, filled from the CLI.

`parse_args` checks every option (and the corpus against the sequence
length) and rejects bad input with a one-line ``argparse`` error naming the
option, before anything is trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import zlib

from data import Corpus, load_corpus

METHODS = ("none", "clip", "zclip", "adagc", "autoclip", "zclip+skip")
DEFAULT_METHODS = ("none", "clip", "zclip", "adagc")
INJECT_KINDS = ("repeat", "random")
# Default injections: these fractions of the steps left after both warm-ups
# (the learning rate's and ZClip's), so that any --steps gets two of them
# with clean training before, between and after.
INJECT_FRACTIONS = (0.4, 0.7)
# The attention scores of one layer, forward and backward, must fit in this
# much memory (bytes); beyond it --seq-len or --batch-size is refused rather
# than left to abort in the allocator.
MAX_ATTENTION_BYTES = 4 << 30


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Everything that determines a run; saved in ``summary.json``.

  The optimizer follows the ZClip paper's Table 1 (AdamW with b1 0.9, b2
  0.999, eps 1e-7, weight decay 0.01; linear warm-up, then cosine decay to
  10% of the peak), scaled down to a byte-level model that trains on two CPU
  cores in seconds per run (see README.md for how the sizes were measured).
  """

  # Run.
  steps: int = 250
  lr: float = 1e-2
  seed: int = 0
  seeds: int = 3  # runs seeds seed, seed + 1, ..., seed + seeds - 1
  methods: tuple[str, ...] = DEFAULT_METHODS
  # Model.
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 2
  seq_len: int = 64
  batch_size: int = 16
  # The training loss is multiplied by this (the logged loss is not): it
  # scales every gradient norm, as a sum instead of a mean would.
  loss_scale: float = 1.0
  # Optimizer (paper's Table 1, scaled).
  warmup_frac: float = 0.05
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  adam_eps: float = 1e-7
  weight_decay: float = 0.01
  # Clipping methods. The `clip` method runs once per threshold.
  clip_norms: tuple[float, ...] = (0.25, 1.0, 4.0)
  clip_norm: float = 1.0  # AdaGC's global cap during its warm-up
  zclip_alpha: float = 0.97
  zclip_z_thresh: float = 2.5
  zclip_warmup_steps: int = 25
  adagc_warmup_steps: int = 100
  autoclip_percentile: float = 10.0
  skip_window: int = 128  # zclip+skip: optax_zclip.skip_spikes' window
  skip_sigma: float = 6.0
  # Injected bad batches: at these steps the training batch is replaced by
  # an outlier batch of kind `inject_kind` (see `data.outlier_batch`).
  inject: tuple[int, ...] = ()
  inject_kind: str = "repeat"
  # Damage and recovery are measured within this many steps after each
  # injection (fewer where the next injection or the run's end comes first).
  horizon: int = 30
  # Loss-spike metric (see optax_zclip.spike_mask), applied to the loss of a
  # fixed held-out probe batch of ``probe_size`` sequences measured every
  # step: unlike the training loss it has no batch-to-batch noise, so a
  # spike that builds up over a few steps stands out.
  probe_size: int = 16
  spike_window: int = 50
  spike_sigma: float = 5.0
  # Evaluation and checkpoints.
  eval_batches: int = 8
  ckpt_every: int = 100
  final_loss_steps: int = 50  # "final loss" is the mean over these steps

  @property
  def ffn_dim(self) -> int:
    return (self.d_model * 8 // 3 + 31) // 32 * 32

  @property
  def lr_warmup_steps(self) -> int:
    return max(1, int(self.warmup_frac * self.steps))

  @property
  def runs(self) -> tuple[str, ...]:
    """Run names: each method, with `clip` as ``clip@<norm>`` per norm."""
    out = []
    for m in self.methods:
      out += [f"clip@{c:g}" for c in self.clip_norms] if m == "clip" else [m]
    return tuple(out)

  @property
  def seed_list(self) -> tuple[int, ...]:
    return tuple(range(self.seed, self.seed + self.seeds))


def default_inject(steps: int, warmup: int) -> tuple[int, ...]:
  """`INJECT_FRACTIONS` of the steps after ``warmup``, as step indices."""
  span = steps - 1 - warmup
  return tuple(sorted({warmup + round(f * span) for f in INJECT_FRACTIONS}))


# The settings the command line exposes, as ``--d-model`` for ``d_model``,
# with their help and the check each value must pass (a predicate and the
# range it states).
_POS = (lambda v: v > 0, "> 0")
_NONNEG = (lambda v: v >= 0, ">= 0")
_ONE = (lambda v: v >= 1, ">= 1")
_UNIT = (lambda v: 0 <= v < 1, "in [0, 1)")
CLI_FIELDS = {
    "steps": ("training steps per run", _ONE),
    "lr": ("peak learning rate", (lambda v: 0 < v <= 10, "in (0, 10]")),
    "seed": ("first seed (model init and batch order)", _NONNEG),
    "seeds": ("how many seeds, from --seed on", _ONE),
    "d_model": (None, (lambda v: v >= 2, ">= 2")),
    "n_layers": (None, _ONE), "n_heads": (None, _ONE),
    "seq_len": (None, (lambda v: v >= 2, ">= 2")),
    "batch_size": (None, _ONE),
    "loss_scale": ("multiplies the training loss (and every gradient)",
                   (lambda v: 1e-6 <= v <= 1e6, "in [1e-6, 1e6]")),
    "b2": (None, _UNIT), "warmup_frac": (None, _UNIT),
    "weight_decay": (None, _NONNEG),
    "clip_norm": ("AdaGC's global cap during its warm-up; given alone, also "
                  "the clip method's one threshold", _POS),
    "zclip_z_thresh": (None, _POS),
    "horizon": ("steps after an injection over which damage and recovery "
                "are measured", _ONE),
    "probe_size": ("held-out sequences whose loss is measured every step "
                   "(loss spikes, damage and recovery are read on it)", _ONE),
    "spike_window": (None, (lambda v: v >= 2, ">= 2")),
    "spike_sigma": (None, _POS),
    "skip_window": ("zclip+skip: skip_spikes' window",
                    (lambda v: v >= 2, ">= 2")),
    "skip_sigma": ("zclip+skip: skip_spikes' sigma", _POS),
    "ckpt_every": ("steps between Orbax checkpoints (0: none)", _NONNEG),
}


def _flag(field: str) -> str:
  return "--" + field.replace("_", "-")


def _floats(p, flag: str, text: str) -> tuple[float, ...]:
  try:
    vals = tuple(float(x) for x in text.split(",") if x.strip())
  except ValueError:
    p.error(f"{flag}: expected comma-separated numbers, got {text!r}")
  if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
    p.error(f"{flag}: expected positive numbers, got {text!r}")
  if len(set(vals)) != len(vals):
    p.error(f"{flag}: {text!r} lists a value twice")
  return vals


def _ints(p, flag: str, text: str) -> tuple[int, ...]:
  try:
    vals = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    p.error(f"{flag}: expected comma-separated steps, got {text!r}")
  if not vals:
    p.error(f"{flag}: no steps given")
  if len(set(vals)) != len(vals):
    p.error(f"{flag}: {text!r} lists a step twice")
  return tuple(sorted(vals))


def _load_corpus(p, path: str | None) -> Corpus:
  try:
    return load_corpus(path)
  except FileNotFoundError:
    p.error(f"--corpus: no such file: {path}")
  except IsADirectoryError:
    p.error(f"--corpus: {path} is a directory, not a text file")
  except (OSError, EOFError, zlib.error) as e:
    p.error(f"--corpus: cannot read {path}: {e}")


def parse_args(argv: list[str] | None = None) -> tuple[DemoConfig, dict]:
  """``(config, options)``: options are ``out``, ``resume``, ``corpus``.

  ``corpus`` is the loaded `data.Corpus`, already checked against the
  sequence length and batch sizes.
  """
  d = DemoConfig()
  p = argparse.ArgumentParser(
      description="Train one small LLaMA-style model under several gradient "
      "clipping methods and seeds, inject bad batches, and measure the "
      "damage each method lets through; write metrics, plots and a summary.")
  for field, (help_text, _) in CLI_FIELDS.items():
    default = getattr(d, field)
    p.add_argument(_flag(field), type=type(default),
                   default=None if field == "clip_norm" else default,
                   help=f"{help_text + '; ' if help_text else ''}default "
                   f"{default}")
  p.add_argument("--methods", default=",".join(d.methods),
                 help=f"comma-separated, from {', '.join(METHODS)}; default "
                 "%(default)s")
  p.add_argument("--clip-norms", default=None,
                 help="thresholds of the clip method, one run each (named "
                 "clip@<norm>); default "
                 f"{','.join(f'{c:g}' for c in d.clip_norms)}")
  p.add_argument("--inject", default=None,
                 help="comma-separated steps whose training batch is "
                 "replaced by an outlier batch; default two steps, at "
                 # %% : argparse %-formats the help text.
                 f"{' and '.join(f'{f:.0%}%' for f in INJECT_FRACTIONS)} of "
                 "the steps after both warm-ups")
  p.add_argument("--inject-kind", default=d.inject_kind, choices=INJECT_KINDS,
                 help="repeat: each sequence one byte repeated; random: "
                 "uniform random bytes; default %(default)s")
  p.add_argument("--out", default="runs/spike_demo", help="output directory")
  p.add_argument("--resume", action="store_true",
                 help="continue each run from its latest checkpoint in --out")
  p.add_argument("--corpus", default=None,
                 help="a text file (optionally .gz) instead of the bundled "
                 "corpus")
  a = p.parse_args(argv)

  for field, (_, (ok, text)) in CLI_FIELDS.items():
    v = getattr(a, field)
    if v is None:
      continue
    if isinstance(v, float) and not math.isfinite(v) or not ok(v):
      p.error(f"{_flag(field)} must be {text}; got {v}")
  methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods:
    p.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
  if len(set(methods)) != len(methods):
    p.error(f"--methods: {a.methods!r} lists a method twice")
  if a.d_model % a.n_heads or (a.d_model // a.n_heads) % 2:
    p.error(f"--d-model {a.d_model} must split into --n-heads {a.n_heads} "
            "heads of even size")
  if a.clip_norms is not None:
    clip_norms = _floats(p, "--clip-norms", a.clip_norms)
  elif a.clip_norm is not None:
    clip_norms = (a.clip_norm,)
  else:
    clip_norms = d.clip_norms
  attention = 2 * 4 * a.batch_size * a.n_heads * a.seq_len ** 2
  if attention > MAX_ATTENTION_BYTES:
    p.error(f"--seq-len {a.seq_len} with --batch-size {a.batch_size} needs "
            f"{attention / 2**30:.0f} GiB for one layer's attention scores; "
            f"the demo allows {MAX_ATTENTION_BYTES / 2**30:.0f} GiB")

  fields = {f: getattr(a, f) for f in CLI_FIELDS if getattr(a, f) is not None}
  cfg = dataclasses.replace(d, methods=methods, clip_norms=clip_norms,
                            inject_kind=a.inject_kind, **fields)
  warmup = max(cfg.lr_warmup_steps, cfg.zclip_warmup_steps)
  if a.inject is None:
    inject = default_inject(cfg.steps, warmup)
    if inject[0] <= warmup or len(inject) < len(INJECT_FRACTIONS):
      p.error(f"--steps {cfg.steps} leaves no room for the default "
              f"injections after the {warmup}-step warm-up; give --steps >= "
              f"{warmup + 6} or --inject")
  else:
    inject = _ints(p, "--inject", a.inject)
    if inject[0] < 0 or inject[-1] > cfg.steps - 2:
      p.error(f"--inject: steps must be in [0, {cfg.steps - 2}] (--steps "
              f"{cfg.steps}, one step after each to measure); got "
              f"{a.inject}")
  cfg = dataclasses.replace(cfg, inject=inject)

  corpus = _load_corpus(p, a.corpus)
  name = a.corpus or "the bundled corpus"
  if corpus.train.size < cfg.seq_len + 2:
    p.error(f"--corpus: {name} has {corpus.train.size} training bytes, too "
            f"few for --seq-len {cfg.seq_len} (needs {cfg.seq_len + 2})")
  windows = (corpus.heldout.size - 1) // cfg.seq_len
  if windows < cfg.probe_size:
    p.error(f"--corpus: the held-out part of {name} ({corpus.heldout.size} "
            f"bytes) holds {windows} windows of --seq-len {cfg.seq_len}, "
            f"fewer than --probe-size {cfg.probe_size}")
  return cfg, {"out": a.out, "resume": a.resume, "corpus": corpus}
