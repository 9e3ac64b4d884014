"""The ``replay`` command: reads a log, replays it, writes the report."""

from __future__ import annotations

import argparse
import math
import os
import textwrap
from typing import Any

import numpy as np

from optax_zclip._replay._engine import replay
from optax_zclip._replay._logs import read_log
from optax_zclip._replay._methods import (
  DEFAULT_METHODS,
  _parse_methods,
  zclip_cap,
)
from optax_zclip._replay._report import (
  OPEN_LOOP,
  cap_note,
  format_table,
  plot,
  summary_rows,
  write_csv,
)
from optax_zclip._replay._textlog import TEXT_LOG


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def _fill(text: str) -> str:
  return textwrap.fill(text, width=79, break_on_hyphens=False)


def add_parser(commands: Any) -> argparse.ArgumentParser:
  """Adds the ``replay`` subcommand to ``commands`` (what
  ``ArgumentParser.add_subparsers`` returns), run by `run`."""
  p = commands.add_parser(
      "replay",
      help="what each clipping rule would have done to a run you logged",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description=_fill(
          "Replays the gradient norms (and losses) of a run you logged "
          "through each clipping rule of optax_zclip, with the package's own "
          "transforms, and shows which steps each rule would have clipped "
          "or skipped, and how hard.") + "\n\n" + _fill(OPEN_LOOP),
      epilog="""\
LOG formats, recognised by their content:
  CSV with a header     TensorBoard and W&B exports (a chart's columns
                        "<run> - <metric>" of one run are read by metric),
                        Lightning's metrics.csv. A row without a value in the
                        norm column (W&B leaves the cell empty when a row
                        logged other metrics) is not a step: it is left out.
                        NaN and inf are non-finite steps.
  JSON lines            one object per line, as the spike demo's
                        metrics.jsonl (nested objects give columns a/b);
                        --where picks one run of several. ms-swift's
                        logging.jsonl: its closing summary is left out.
  trainer_state.json    Hugging Face Transformers: the log_history entries with
                        a grad_norm (evaluation entries have none).
  one number per line   the norms alone.
  TensorBoard           an event file, or a run directory (every event file
                        below it, merged by step); needs
                        pip install "optax-zclip[tensorboard]".
  text log              lines of key: value, key=value or |-separated pairs
                        (Megatron-LM, torchtitan, llm.c, fairseq), or printed
                        dicts (the Hugging Face Trainer's console, fairseq's
                        json format); a line is a step when it holds a norm
                        and a step (dicts without a step are numbered 0, 1,
                        2, ...). A launcher's rank prefix ([default3]:,
                        [rank0]:) is stripped; the lowest rank that logged
                        norms is read.
Every format: a step logged again (a restart from a checkpoint) keeps its last
write, the steps are replayed in order, and the output counts them.
Columns, when not given: the norm before clipping wherever a log has it and
another (learning/raw_grad_norm, grad_norm, train/grad_norm, grad norm,
grad_2.0_norm_total, gnorm, skip/grad_norm, ..., norm, or the one column
ending in grad_norm); the loss is the first of loss, train/loss, train_loss,
train_loss_step, lm loss, loss_metrics/global_avg_loss, learning/loss or trl
with values on the rows with a norm; the step likewise, of step, _step, Step,
global_step, global_step/max_steps (n of "n/N"), num_updates, iteration, s, ...
(without one, the rows are numbered from 0).

METHODS, comma-separated:
  zclip                      optax_zclip.zclip() with its defaults
                             (max_grad_norm=1.0 included)
  zclip:z_thresh=3,max_grad_norm=none
                             with arguments (numbers, none, true, false, words)
  clip@1                     optax_zclip.clip_by_global_norm(1.0)
  autoclip, autoclip:percentile=5,window=512
  skip, skip:window=64,sigma=5
                             optax_zclip.skip_spikes(optax.identity()): the
                             norm test, and the loss test with a loss column
  "zclip:z_thresh=2|2.5|3"   a sweep: one method per value (clip@0.5|1|2 too;
                             several swept arguments give every combination);
                             quote it, | is the shell's pipe
  AdaGC is per tensor and a log holds the global norm: it cannot be replayed.

Writes DIR/replay.csv (step, grad_norm, and per method <method>/threshold,
<method>/out_norm, <method>/clipped, and <method>/skipped for skip) and
DIR/replay.png (needs matplotlib), and prints a table per method.

Example:
  optax-zclip replay run.csv --norm-column train/grad_norm \\
      --loss-column train/loss --step-column _step --methods zclip,clip@1 \\
      --out replay_out""")
  p.add_argument("log", metavar="LOG", help="the log file")
  p.add_argument("--norm-column", metavar="C",
                 help="the column of the global gradient norm, before "
                      "clipping")
  p.add_argument("--loss-column", metavar="C",
                 help="the column of the training loss (for skip's loss "
                      "test, and the plot)")
  p.add_argument("--step-column", metavar="C", help="the column of the step")
  p.add_argument("--where", metavar="COLUMN=VALUE", action="append",
                 default=[],
                 help="keep only the rows whose COLUMN is VALUE (repeatable), "
                      "for a log of several runs")
  p.add_argument("--methods", default=DEFAULT_METHODS, metavar="METHODS",
                 help=f"what to replay (default {DEFAULT_METHODS}); see "
                      "below")
  p.add_argument("--out", default="replay", metavar="DIR",
                 help="where to write replay.csv and replay.png (default "
                      "./replay)")
  p.add_argument("--warmup", type=int, metavar="N",
                 help="the run's warm-up, in steps, which the table counts "
                      "apart (default: the first 10%% of the logged steps)")
  p.add_argument("--no-plot", action="store_true",
                 help="write no plot")
  p.set_defaults(run=run)
  return p


def run(args: argparse.Namespace) -> int:
  """Replays the log ``args`` names and writes the report; the exit status.

  Bad input raises `ValueError` (a `LogError` for the log) or `OSError`,
  which the command line reports on one line.
  """
  if args.warmup is not None and args.warmup < 0:
    raise ValueError(f"--warmup must be >= 0; got {args.warmup}")
  # Check the methods before reading (a typo should not wait for the log).
  _parse_methods(args.methods)
  log = read_log(args.log, args.norm_column, args.loss_column,
                 args.step_column, args.where)
  result = replay(log.norms, log.losses, args.methods, steps=log.steps)

  n = len(log.norms)
  cols = [f"norms from {log.norm_column!r}" if log.norm_column else None,
          f"losses from {log.loss_column!r}" if log.losses else
          None if log.loss_column else
          "no loss column found (skip's loss test is off)",
          f"steps from {log.step_column!r}" if log.step_column else
          "no step column: rows numbered from 0"]
  print(_fill(f"Replayed {_count(n, 'step')} ({log.steps[0]} to "
              f"{log.steps[-1]}) of "
              f"{args.log} ({log.fmt}): {', '.join(c for c in cols if c)}."))
  if log.left_out:
    if log.fmt == TEXT_LOG and log.numbered:
      print(_fill(f"Left out {_count(log.left_out, 'line')} without a norm "
                  "(progress bars, evaluation and summary lines, warnings)."))
    elif log.fmt == TEXT_LOG:
      print(_fill(f"Left out {_count(log.left_out, 'line')} without a step "
                  "and a norm (evaluation lines, banners)."))
    else:
      print(_fill(f"Left out {_count(log.left_out, 'row')} without a value "
                  f"in {log.norm_column!r} (not a step: the row logged other "
                  "values)."))
  for note in log.notes:
    print(_fill(f"Note: {note}."))
  nonfinite = int(np.sum(~np.isfinite(log.norms)))
  if nonfinite:
    print(_fill(f"{_count(nonfinite, 'norm')} "
                f"{'is' if nonfinite == 1 else 'are'} NaN or Inf: non-finite "
                "steps, which the clipping methods pass through untouched and "
                "skip skips."))
  if log.loss_column and not log.losses:
    print(_fill(f"Column {log.loss_column!r} holds no loss on a step with a "
                "norm: skip tests the norms alone."))
  print()
  print(_fill(OPEN_LOOP))
  print()
  first, last = int(log.steps[0]), int(log.steps[-1])
  warmup = (args.warmup if args.warmup is not None
            else max(1, math.ceil(0.1 * (last - first + 1))))
  rows = summary_rows(result, first + warmup)
  print(format_table(rows))
  print()
  origin = ("--warmup" if args.warmup is not None
            else "the first 10% of the steps; --warmup to change")
  print(_fill(
      "clipped: steps whose norm the method lowered (count, % of the steps), "
      "skipped ones included; by the cap: those of its clips a fixed cap "
      "made (ZClip's max_grad_norm; all of clip@'s); cut: the norm before "
      "over the norm after, on "
      "the steps clipped, not skipped; skipped: steps skip_spikes skipped, "
      "NaN and Inf ones included; in "
      "warm-up / later: steps clipped or skipped before step "
      f"{first + warmup} ({origin}) and after."))
  finite = log.norms[np.isfinite(log.norms)]
  for row in rows:
    spelled = zclip_cap(row["method"])
    note = spelled and finite.size and cap_note(
        row, *spelled, float(np.median(finite)))
    if note:
      print()
      print(_fill(f"Note: {note}."))
  os.makedirs(args.out, exist_ok=True)
  csv_path = os.path.join(args.out, "replay.csv")
  write_csv(csv_path, result)
  wrote = [f"{csv_path} ({n} rows)"]
  if not args.no_plot:
    png = os.path.join(args.out, "replay.png")
    try:
      plot(png, result, log.losses,
           title=f"{os.path.basename(args.log)}: replay (open loop)")
      wrote.append(png)
    except ImportError:
      print("\nNo plot: matplotlib is not installed (pip install matplotlib, "
            "or pip install \"optax-zclip[examples]\").")
  print(f"\nWrote {' and '.join(wrote)}.")
  return 0

