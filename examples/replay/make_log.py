"""Writes the example log of the replay guide: a run in a W&B export's form.

The run is the spike demo's ``none`` run (no clipping) over 1200 steps, seed
0, with a bad batch at steps 420, 760 and 1010:

    python examples/spike_demo.py --methods none --seeds 1 --steps 1200 \\
        --inject 420,760,1010 --ckpt-every 0 --out runs/replay_log
    python examples/replay/make_log.py runs/replay_log/metrics.jsonl \\
        examples/replay/spike_demo_run.csv

It keeps the branch with the bad batches, and writes the columns a
Weights & Biases run export has: ``_step``, ``train/loss``,
``train/grad_norm`` (before clipping), ``train/learning_rate`` and, every 100
steps, ``eval/loss`` (the demo's held-out probe loss); the other rows leave
that cell empty, as W&B does.
"""

import csv
import json
import sys


def main(argv):
  source, target = argv
  with open(source) as f:
    rows = [json.loads(line) for line in f]
  rows = [r for r in rows if r["method"] == "none" and r["seed"] == 0
          and r["branch"] == "injected"]
  with open(target, "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["_step", "train/loss", "train/grad_norm",
                "train/learning_rate", "eval/loss"])
    for r in rows:
      w.writerow([r["step"], f"{r['loss']:.6g}", f"{r['grad_norm']:.6g}",
                  f"{r['lr']:.6g}",
                  f"{r['probe_loss']:.6g}" if r["step"] % 100 == 0 else ""])


if __name__ == "__main__":
  main(sys.argv[1:])
