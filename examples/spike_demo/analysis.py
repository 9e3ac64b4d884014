"""What the demo measures from the per-step rows: damage, recovery, spread.

Every figure is computed per seed from the rows of `train.run_seed` and then
aggregated across seeds (`aggregate`) and compared between runs paired by
seed (`paired`). The definitions are repeated in ``summary.json``
(`DEFINITIONS`) and in README.md.
"""

from __future__ import annotations

import itertools

import numpy as np

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
