"""The spike demo: no clipping, fixed clipping, ZClip and AdaGC side by side.

Trains the same small LLaMA-style byte model (`model.py`), from the same
init, on the same batches of the bundled corpus (`data.py`), at a high peak
learning rate, once per clipping method, each chained before AdamW with
warm-up and cosine decay as in the ZClip paper's Table 1 (`config.py`), by
one train step for every method (`train.py`). Then writes to ``--out``:

* ``metrics.jsonl``: one line per method and step: loss, probe loss (a fixed
  held-out batch, measured every step), learning rate,
  gradient norm before and after clipping, the clipping threshold, whether
  the step was clipped, whether ZClip detected a spike, whether the probe
  loss spiked;
* ``loss.png`` and ``grad_norm.png``: all methods on shared axes
  (`plots.py`);
* ``summary.json``: per method the final and held-out loss, loss-spike count
  and score of the probe loss (`optax_zclip.count_spikes` / `spike_score`),
  the same count on the training loss, clipped steps and
  speed, plus the configuration; the same table is printed.

Each method checkpoints with Orbax (model, optimizer and clipping state)
under ``--out/<method>/``; ``--resume`` continues from there. The command is
the thin ``examples/spike_demo.py``, which runs this file's `main`; running
this file directly does the same:

  python examples/spike_demo.py            # defaults, ~5 minutes on 2 cores
  python examples/spike_demo.py --steps 200 --methods zclip,clip --out runs/x
  python examples/spike_demo/main.py --steps 200
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import numpy as np
from tqdm import tqdm

import optax_zclip

from config import parse_args
from data import load_corpus
from model import num_params
from plots import plot_grad_norm, plot_loss, series
from train import make_model, run_method


def summarize(method, result, cfg) -> tuple[dict, np.ndarray]:
  """The summary entry of one run and its loss-spike mask.

  Loss spikes are flagged on the probe loss (see `DemoConfig.probe_size`);
  ``train_loss_spike_count`` applies the same rule to the noisy per-batch
  training loss, for comparison.
  """
  losses, probe = series(result.rows, "loss"), series(result.rows,
                                                         "probe_loss")
  kw = dict(window=cfg.spike_window, n_sigma=cfg.spike_sigma)
  mask = optax_zclip.spike_mask(probe, **kw)
  tail = losses[-min(cfg.final_loss_steps, losses.size):]
  return {
      "method": method,
      "final_loss": float(np.mean(tail)),
      "eval_loss": result.eval_loss,
      "spike_count": optax_zclip.count_spikes(probe, **kw),
      "spike_score": optax_zclip.spike_score(probe, **kw),
      "train_loss_spike_count": optax_zclip.count_spikes(losses, **kw),
      "clipped_steps": int(sum(r["clipped"] for r in result.rows)),
      # None when no step was timed (a run resumed at its last step).
      "steps_per_second": (result.steps_per_second
                           if np.isfinite(result.steps_per_second) else None),
  }, mask


def format_table(runs: list[dict]) -> str:
  head = (f"{'method':10s} {'final loss':>10s} {'eval loss':>9s} "
          f"{'spikes':>6s} {'spike score':>11s} {'clipped':>7s} "
          f"{'steps/s':>7s}")
  lines = [head, "-" * len(head)]
  for r in runs:
    lines.append(
        f"{r['method']:10s} {r['final_loss']:10.4f} {r['eval_loss']:9.4f} "
        f"{r['spike_count']:6d} {r['spike_score']:11.4f} "
        f"{r['clipped_steps']:7d} {r['steps_per_second'] or float('nan'):7.1f}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  """Runs the demo; returns the summary (also written to summary.json)."""
  cfg, opts = parse_args(argv)
  out = pathlib.Path(opts["out"])
  out.mkdir(parents=True, exist_ok=True)
  corpus = load_corpus(opts["corpus"])
  print(f"corpus {corpus.source}: {corpus.train.size:,} training bytes, "
        f"{corpus.heldout.size:,} held out; model "
        f"{num_params(make_model(cfg)):,} parameters; peak lr {cfg.lr:g}, "
        f"{cfg.steps} steps")

  results, masks, summary_runs = {}, {}, []
  for method in cfg.methods:
    with tqdm(total=cfg.steps, desc=f"{method:9s}", unit="step",
              file=sys.stdout, dynamic_ncols=True) as bar:
      result = run_method(method, cfg, corpus, out / method,
                          resume=opts["resume"], progress=bar)
    entry, mask = summarize(method, result, cfg)
    results[method], masks[method] = result, mask
    summary_runs.append(entry)

  with open(out / "metrics.jsonl", "w") as f:
    for method, result in results.items():
      for row, spike in zip(result.rows, masks[method], strict=True):
        f.write(json.dumps({"method": method, **row,
                            "loss_spike": bool(spike)}) + "\n")
  title = (f"{cfg.d_model}-wide, {cfg.n_layers}-layer byte LM, peak lr "
           f"{cfg.lr:g}, seed {cfg.seed}")
  rows = {m: r.rows for m, r in results.items()}
  plot_loss(rows, masks, {r["method"]: r["spike_count"] for r in summary_runs},
            out / "loss.png", title)
  plot_grad_norm(rows, out / "grad_norm.png", title)
  summary = {"runs": summary_runs,
             "config": {**dataclasses.asdict(cfg), "corpus": corpus.source}}
  with open(out / "summary.json", "w") as f:
    json.dump(summary, f, indent=2)
  print(format_table(summary_runs))
  print(f"wrote {out}/metrics.jsonl, loss.png, grad_norm.png, summary.json")
  return summary


if __name__ == "__main__":
  main()
