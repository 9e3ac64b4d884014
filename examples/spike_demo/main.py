"""The spike demo: how clipping methods absorb the spikes of bad batches.

Trains the same small LLaMA-style byte model (`model.py`), from the same
init, on the same batches of the bundled corpus (`data.py`), at a high peak
learning rate, once per run and seed: no clipping, fixed clipping at each
threshold of ``--clip-norms`` (runs ``clip@<norm>``), ZClip, AdaGC (and on
request AutoClip and ZClip inside `optax_zclip.skip_spikes`), each chained
before AdamW with warm-up and cosine decay as in the ZClip paper's Table 1
(`config.py`), by one train step for every method (`train.py`). At the
``--inject`` steps the training batch is replaced by an outlier batch; each
run also continues from the first injected step without them, the noise
floor. The probe loss around the injected steps gives each run's damage
and recovery (`damage_recovery`). Then writes to ``--out``:

* ``metrics.jsonl``: one line per run, seed, branch (``clean`` or
  ``injected``) and step: loss, probe loss (a fixed held-out batch,
  measured every step), learning rate, gradient norm before and after
  clipping, the clipping threshold, whether the step was clipped, whether
  ZClip detected a spike, whether the batch was injected, whether the probe
  loss spiked;
* ``damage.png`` (damage and recovery per run, error bars across seeds),
  ``injection_loss.png`` (the probe loss around the injections, one panel
  per run), ``grad_norm.png`` (the norm before and after clipping, one
  panel per run), ``loss.png`` (every run's loss, first seed);
* ``summary.json``: per run the mean and standard deviation across seeds of
  damage, recovery, their clean counterparts, the injected norm's ratio to
  the median, final and held-out loss, loss spikes, clipped steps and
  speed, each seed's figures in ``per_seed``; every pair of runs compared
  seed by seed in ``paired``; the configuration and the definitions. The
  main table is printed.

Each run and seed checkpoints with Orbax (model, optimizer and clipping
state) under ``--out/<run>/seed<k>/``; ``--resume`` continues from there.
The command is the thin ``examples/spike_demo.py``, which runs this file's
`main`; running this file directly does the same:

  python examples/spike_demo.py            # defaults, ~6 minutes on 2 cores
  python examples/spike_demo.py --seeds 1 --methods zclip,clip --out runs/x
  python examples/spike_demo/main.py --steps 200
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import sys
import time

import numpy as np
from tqdm import tqdm

import optax_zclip

import plots
from config import parse_args
from model import num_params
from plots import series
from train import has_checkpoint, make_model, run_seed

# What the demo measures from the per-step rows: every figure is computed
# per seed, then aggregated across seeds (`aggregate`) and compared between
# runs paired by seed (`paired`). The definitions are repeated in
# summary.json and README.md.

DEFINITIONS = {
    "damage": "per injected step t, with h = min(horizon, next injected "
    "step - t, steps - 1 - t): max over k = 1..h of probe_loss[t + k] - "
    "probe_loss[t] (probe_loss[t] is measured before step t's update); "
    "averaged over the injected steps",
    "recovery": "per injected step t: the least k in 1..h with "
    "probe_loss[t + k] <= probe_loss[t], h if there is none; averaged over "
    "the injected steps",
    "clean_damage, clean_recovery": "the same on the clean continuation "
    "(same prefix, no injection) at the same steps: the noise floor",
    "excess_damage": "damage - clean_damage, per seed",
    "inject_norm_ratio": "gradient norm (before clipping) at each injected "
    "step over the median norm of the clean continuation after both "
    "warm-ups, averaged over the injected steps",
    "passed_norm_ratio": "the same for the norm after clipping (what "
    "reached AdamW)",
    "final_loss": "mean training loss of the last final_loss_steps steps "
    "of the injected continuation (clean_final_loss: of the clean one)",
    "eval_loss": "mean loss of the held-out evaluation batches after the "
    "last step (clean_eval_loss: of the clean continuation)",
    "spike_count, spike_score": "loss spikes of the injected run's probe "
    "loss, optax_zclip.count_spikes / spike_score (spike_window, "
    "spike_sigma)",
    "clipped_steps": "steps whose norm after clipping is below the norm "
    "before (injected run)",
    "<figure>, <figure>_std": "mean and sample standard deviation (ddof=1) "
    "across seeds; std is null with one seed",
    "paired": "per pair of runs (a, b) and figure: the per-seed differences "
    "a - b, their mean and standard deviation, and on how many seeds a is "
    "lower; 'separated' when every seed has the same sign and |mean| > 2 * "
    "std / sqrt(seeds) (a rough rule, not a significance test)",
}


def horizons(inject: tuple[int, ...], steps: int, horizon: int) -> list[int]:
  """The steps measured after each injection (see ``DEFINITIONS``)."""
  nxt = list(inject[1:]) + [None]
  return [min(horizon, steps - 1 - t, *(() if n is None else (n - t,)))
          for t, n in zip(inject, nxt, strict=True)]


def damage_recovery(probe: np.ndarray, inject: tuple[int, ...],
                    horizon: int) -> tuple[list[float], list[int]]:
  """Per injected step: the probe loss's worst rise and its recovery."""
  damage, recovery = [], []
  for t, h in zip(inject, horizons(inject, probe.size, horizon), strict=True):
    after = probe[t + 1: t + 1 + h] - probe[t]
    damage.append(float(after.max()))
    back = np.flatnonzero(after <= 0)
    recovery.append(int(back[0]) + 1 if back.size else h)
  return damage, recovery


def aggregate(per_seed: list[dict], keys: list[str]) -> dict:
  """``key`` (mean across seeds) and ``key_std`` (ddof=1) for each key."""
  out = {}
  for k in keys:
    vals = [s[k] for s in per_seed]
    if any(v is None for v in vals):
      out[k], out[k + "_std"] = None, None
      continue
    v = np.asarray(vals, float)
    out[k] = float(v.mean())
    out[k + "_std"] = float(v.std(ddof=1)) if v.size > 1 else None
  return out


PAIRED_FIGURES = ("damage", "recovery", "excess_damage", "final_loss",
                  "eval_loss", "clean_final_loss", "clean_eval_loss")


def paired(runs: list[dict]) -> list[dict]:
  """Every pair of runs compared per seed on `PAIRED_FIGURES`."""
  out = []
  for a, b in itertools.combinations(runs, 2):
    for fig in PAIRED_FIGURES:
      d = np.array([x[fig] - y[fig] for x, y in
                    zip(a["per_seed"], b["per_seed"], strict=True)], float)
      n = d.size
      std = float(d.std(ddof=1)) if n > 1 else None
      same_sign = bool(np.all(d > 0) or np.all(d < 0))
      out.append({
          "a": a["method"], "b": b["method"], "figure": fig,
          "diff": float(d.mean()), "diff_std": std,
          "per_seed": d.tolist(), "a_lower_on": int((d < 0).sum()),
          "seeds": n,
          "separated": bool(n > 1 and same_sign
                            and abs(d.mean()) > 2 * std / np.sqrt(n)),
      })
  return out


# Per-seed figures that are averaged across seeds (each gets a ``_std``).
FIGURES = ["damage", "recovery", "clean_damage", "clean_recovery",
           "excess_damage", "inject_norm_ratio", "passed_norm_ratio",
           "final_loss", "eval_loss", "clean_final_loss", "clean_eval_loss",
           "spike_count", "spike_score", "train_loss_spike_count",
           "clipped_steps", "clean_clipped_steps", "skipped_steps",
           "steps_per_second"]


def seed_figures(result, cfg, seed: int) -> tuple[dict, dict]:
  """The figures of one run and seed, and the loss-spike masks by branch.

  Loss spikes are flagged on the probe loss (see `DemoConfig.probe_size`);
  ``train_loss_spike_count`` applies the same rule to the noisy per-batch
  training loss, for comparison.
  """
  kw = dict(window=cfg.spike_window, n_sigma=cfg.spike_sigma)
  inj, clean = result.injected.rows, result.clean.rows
  probe = series(inj, "probe_loss")
  damage, recovery = damage_recovery(probe, cfg.inject, cfg.horizon)
  c_damage, c_recovery = damage_recovery(series(clean, "probe_loss"),
                                         cfg.inject, cfg.horizon)
  warm = max(cfg.lr_warmup_steps, cfg.zclip_warmup_steps)
  median = float(np.median(series(clean, "grad_norm")[warm:]))
  norms, passed = series(inj, "grad_norm"), series(inj, "clipped_norm")
  at = list(cfg.inject)
  n_final = min(cfg.final_loss_steps, len(inj))
  sps = (result.timed_steps / result.timed_seconds
         if result.timed_seconds > 0 and result.timed_steps > 0 else None)
  fig = {
      "seed": seed,
      "damage": float(np.mean(damage)), "recovery": float(np.mean(recovery)),
      "clean_damage": float(np.mean(c_damage)),
      "clean_recovery": float(np.mean(c_recovery)),
      "excess_damage": float(np.mean(damage) - np.mean(c_damage)),
      "damage_per_injection": damage, "recovery_per_injection": recovery,
      "clean_damage_per_injection": c_damage,
      "clean_recovery_per_injection": c_recovery,
      "inject_norm_ratio": float(np.mean(norms[at]) / median),
      "passed_norm_ratio": float(np.mean(passed[at]) / median),
      "median_grad_norm": median,
      "final_loss": float(np.mean(series(inj, "loss")[-n_final:])),
      "eval_loss": result.injected.eval_loss,
      "clean_final_loss": float(np.mean(series(clean, "loss")[-n_final:])),
      "clean_eval_loss": result.clean.eval_loss,
      "spike_count": optax_zclip.count_spikes(probe, **kw),
      "spike_score": optax_zclip.spike_score(probe, **kw),
      "train_loss_spike_count": optax_zclip.count_spikes(
          series(inj, "loss"), **kw),
      "clipped_steps": int(sum(r["clipped"] for r in inj)),
      "clean_clipped_steps": int(sum(r["clipped"] for r in clean)),
      "skipped_steps": (int(sum(r["skipped"] for r in inj))
                        if "skipped" in inj[0] else None),
      # None when no step was timed (a run resumed at its last step).
      "steps_per_second": sps,
  }
  masks = {"injected": optax_zclip.spike_mask(probe, **kw),
           "clean": optax_zclip.spike_mask(series(clean, "probe_loss"), **kw)}
  return fig, masks


def _pm(r: dict, k: str, fmt: str) -> str:
  std = r.get(k + "_std")
  return (f"{r[k]:{fmt}}" + (f"±{std:{fmt}}" if std is not None else "")
          if r[k] is not None else "-")


def format_table(runs: list[dict]) -> str:
  """The main figures of every run, mean ± std across seeds."""
  cols = [("damage", ".3f"), ("clean_damage", ".3f"), ("recovery", ".1f"),
          ("inject_norm_ratio", ".1f"), ("passed_norm_ratio", ".1f"),
          ("final_loss", ".3f"), ("eval_loss", ".3f"),
          ("clean_final_loss", ".3f"), ("clipped_steps", ".0f")]
  names = ["damage", "clean dmg", "recovery", "norm x", "passed x",
           "final loss", "eval loss", "clean final", "clipped"]
  cells = [[r["method"]] + [_pm(r, k, f) for k, f in cols] for r in runs]
  head = ["run"] + names
  widths = [max(len(x) for x in col) for col in zip(head, *cells,
                                                     strict=True)]
  line = lambda row: "  ".join(  # noqa: E731
      x.ljust(w) if i == 0 else x.rjust(w)
      for i, (x, w) in enumerate(zip(row, widths, strict=True)))
  return "\n".join([line(head), "-" * len(line(head))]
                   + [line(c) for c in cells])


def main(argv: list[str] | None = None) -> dict:
  """Runs the demo; returns the summary (also written to summary.json)."""
  cfg, opts = parse_args(argv)
  corpus = opts["corpus"]
  out = pathlib.Path(opts["out"])
  if opts["resume"] and not has_checkpoint(out):
    print(f"--resume: nothing to resume in {out} (no checkpoint there); "
          "starting from step 0")
  out.mkdir(parents=True, exist_ok=True)
  print(f"corpus {corpus.source}: {corpus.train.size:,} training bytes, "
        f"{corpus.heldout.size:,} held out; model "
        f"{num_params(make_model(cfg)):,} parameters; peak lr {cfg.lr:g}, "
        f"{cfg.steps} steps, seeds {list(cfg.seed_list)}, "
        f"{cfg.inject_kind} batches injected at steps {list(cfg.inject)}, "
        f"loss scale {cfg.loss_scale:g}")

  t_start = time.perf_counter()
  results, summary_runs = {}, []
  per_seed_steps = 2 * cfg.steps - cfg.inject[0]
  for run in cfg.runs:
    per_seed, results[run] = [], {}
    with tqdm(total=per_seed_steps * cfg.seeds, desc=f"{run:10s}",
              unit="step", file=sys.stdout, dynamic_ncols=True) as bar:
      for seed in cfg.seed_list:
        result = run_seed(run, cfg, corpus, seed, out / run / f"seed{seed}",
                          resume=opts["resume"], progress=bar)
        fig, masks = seed_figures(result, cfg, seed)
        results[run][seed] = (result, masks)
        per_seed.append(fig)
    summary_runs.append({"method": run, **aggregate(per_seed, FIGURES),
                         "per_seed": per_seed})
  wall = time.perf_counter() - t_start

  with open(out / "metrics.jsonl", "w") as f:
    for run, by_seed in results.items():
      for seed, (result, masks) in by_seed.items():
        for branch in ("clean", "injected"):
          rows = getattr(result, branch).rows
          for row, spike in zip(rows, masks[branch], strict=True):
            f.write(json.dumps({
                "method": run, "seed": seed, "branch": branch, **row,
                "injected": branch == "injected" and row["step"] in cfg.inject,
                "loss_spike": bool(spike)}) + "\n")
  title = (f"{cfg.d_model}-wide, {cfg.n_layers}-layer byte LM, peak lr "
           f"{cfg.lr:g}, {cfg.inject_kind} batches at {list(cfg.inject)}"
           + (f", loss x{cfg.loss_scale:g}" if cfg.loss_scale != 1 else ""))
  branch_rows = {b: {run: {s: getattr(r, b).rows for s, (r, _) in bs.items()}
                     for run, bs in results.items()}
                 for b in ("clean", "injected")}
  first = cfg.seed_list[0]
  first_rows = {run: rs[first] for run, rs in branch_rows["injected"].items()}
  plots.plot_damage(summary_runs, out / "damage.png",
                    f"{title}, {cfg.seeds} seed{'s' * (cfg.seeds > 1)}")
  plots.plot_injection_loss(branch_rows, cfg.inject, cfg.horizon,
                            out / "injection_loss.png", title)
  plots.plot_grad_norm(first_rows, cfg.inject, out / "grad_norm.png",
                       f"{title}, seed {first}")
  plots.plot_loss(first_rows, {run: bs[first][1]["injected"]
                               for run, bs in results.items()},
                  out / "loss.png", f"{title}, seed {first}")
  summary = {"runs": summary_runs, "paired": paired(summary_runs),
             "wall_seconds": wall,
             "config": {**dataclasses.asdict(cfg), "runs": list(cfg.runs),
                        "seeds_run": list(cfg.seed_list),
                        "corpus": corpus.source,
                        "definitions": DEFINITIONS}}
  with open(out / "summary.json", "w") as f:
    json.dump(summary, f, indent=2)
  print(format_table(summary_runs))
  print(f"mean ± std over {cfg.seeds} seed(s); damage in nats/byte of the "
        f"probe loss, recovery in steps (horizon {cfg.horizon}); norm x / "
        "passed x: the injected step's norm before / after clipping over "
        f"the median. {wall:.0f} s.")
  print(f"wrote {out}/metrics.jsonl, damage.png, injection_loss.png, "
        "grad_norm.png, loss.png, summary.json")
  return summary


if __name__ == "__main__":
  main()
