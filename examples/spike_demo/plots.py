"""The demo's figures: damage, loss around the injections, gradient norms."""

from __future__ import annotations

import math
import pathlib

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

COLORS = {"none": "tab:red", "zclip": "tab:blue", "adagc": "tab:green",
          "autoclip": "tab:purple", "zclip+skip": "tab:cyan"}
LABELS = {"none": "no clipping", "zclip": "ZClip", "adagc": "AdaGC",
          "autoclip": "AutoClip", "zclip+skip": "ZClip + skip_spikes"}


def color(run: str, runs: list[str] | None = None):
  """A run's colour; the fixed thresholds in shades of orange, tight dark."""
  if run.startswith("clip@"):
    clips = sorted((r for r in runs or [run] if r.startswith("clip@")),
                   key=lambda r: float(r[5:]))
    shade = 0.35 + 0.5 * clips.index(run) / max(1, len(clips) - 1)
    return plt.get_cmap("Oranges_r")(shade * 0.7)
  return COLORS.get(run, "tab:gray")


def label(run: str) -> str:
  return LABELS.get(run, run)


def _ema(x: np.ndarray, alpha: float = 0.9) -> np.ndarray:
  out, acc = np.empty_like(x), x[0]
  for i, v in enumerate(x):
    acc = alpha * acc + (1 - alpha) * v
    out[i] = acc
  return out


def series(rows: list[dict], key: str) -> np.ndarray:
  """``key`` of every row as a float array, None as NaN."""
  return np.array([np.nan if r[key] is None else r[key] for r in rows], float)


def _grid(n: int, width: float = 4.2, height: float = 3.0):
  cols = min(n, 3)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows),
                           sharex=True, sharey=True, squeeze=False)
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  return fig, list(axes.flat[:n])


def plot_damage(runs: list[dict], path: pathlib.Path, title: str) -> None:
  """Damage and recovery per run: mean with std error bars, each seed a dot.

  Beside each run's bar, a light one: the same figure on the clean
  continuation, the noise floor.
  """
  names = [r["method"] for r in runs]
  fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(runs) + 3), 4.2))
  x = np.arange(len(runs))
  for ax, key, ylabel in (
      (axes[0], "damage", "damage: worst probe-loss rise (nats/byte)"),
      (axes[1], "recovery", "recovery: steps back to the level before")):
    for i, r in enumerate(runs):
      c = color(r["method"], names)
      for off, k, alpha in ((-0.18, key, 1.0), (0.18, "clean_" + key, 0.3)):
        std = r[k + "_std"]
        ax.bar(x[i] + off, r[k], 0.34, color=c, alpha=alpha,
               yerr=None if std is None else std, capsize=3,
               error_kw={"lw": 1})
        vals = [s[k] for s in r["per_seed"]]
        ax.scatter(np.full(len(vals), x[i] + off), vals, s=10, color="k",
                   zorder=3)
    ax.set_xticks(x, [label(n) for n in names], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  axes[1].legend(handles=[
      Patch(color="0.3", label="with bad batches"),
      Patch(color="0.3", alpha=0.3, label="clean continuation (noise floor)")],
                 fontsize=8)
  fig.suptitle(title + "\nbars: mean over seeds, error bars: std, dots: "
               "seeds", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_injection_loss(rows: dict[str, dict[str, dict[int, list[dict]]]],
                        inject: tuple[int, ...], horizon: int,
                        path: pathlib.Path, title: str) -> None:
  """Probe loss from before the first injection on, one panel per run.

  ``rows[branch][run][seed]``: the seed mean is drawn bold (injected) and
  dashed (clean), each seed faint; vertical lines mark the injections.
  """
  runs = list(rows["injected"])
  fig, axes = _grid(len(runs))
  lo = max(0, inject[0] - horizon // 2)
  for ax, run in zip(axes, runs, strict=True):
    c = color(run, runs)
    for branch, ls, lw in (("clean", "--", 1.0), ("injected", "-", 1.6)):
      curves = [series(r, "probe_loss")[lo:]
                for r in rows[branch][run].values()]
      steps = np.arange(lo, lo + curves[0].size)
      if branch == "injected":
        for y in curves:
          ax.plot(steps, y, color=c, lw=0.5, alpha=0.35)
      ax.plot(steps, np.mean(curves, axis=0), color=c if ls == "-" else "k",
              ls=ls, lw=lw, label=f"{branch} (seed mean)")
    for t in inject:
      ax.axvline(t, color="k", lw=0.6, alpha=0.4)
    ax.set_title(label(run), fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.supxlabel("step (vertical lines: injected batches)", fontsize=9)
  fig.supylabel("probe loss (nats/byte)", fontsize=9)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_grad_norm(runs: dict[str, list[dict]], inject: tuple[int, ...],
                   path: pathlib.Path, title: str) -> None:
  """Gradient norm before and after clipping, and the threshold, per run."""
  names = list(runs)
  fig, axes = _grid(len(names))
  for ax, run in zip(axes, names, strict=True):
    rows = runs[run]
    steps = series(rows, "step")
    ax.plot(steps, series(rows, "grad_norm"), color="0.6", lw=0.8,
            label="before clipping")
    ax.plot(steps, series(rows, "clipped_norm"), color=color(run, names),
            lw=0.8, label="after (into AdamW)")
    thr = series(rows, "threshold")
    if np.isfinite(thr).any():
      ax.plot(steps, thr, color="k", lw=0.8, ls=":", label="threshold")
    for t in inject:
      ax.axvline(t, color="k", lw=0.6, alpha=0.3)
    ax.set_yscale("log")
    ax.set_title(label(run), fontsize=9)
    ax.grid(alpha=0.3, which="both")
  axes[0].legend(fontsize=7)
  fig.supxlabel("step (vertical lines: injected batches)", fontsize=9)
  fig.supylabel("global gradient norm", fontsize=9)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_loss(runs: dict[str, list[dict]], spikes: dict[str, np.ndarray],
              path: pathlib.Path, title: str) -> None:
  """Training loss (faint, EMA) and probe loss (bold); loss spikes marked."""
  names = list(runs)
  fig, ax = plt.subplots(figsize=(9, 5))
  for run, rows in runs.items():
    steps, probe = series(rows, "step"), series(rows, "probe_loss")
    c = color(run, names)
    ax.plot(steps, _ema(series(rows, "loss")), color=c, alpha=0.3, lw=0.8)
    ax.plot(steps, probe, color=c, lw=1.4, label=label(run))
    flagged = spikes[run]
    ax.scatter(steps[flagged], probe[flagged], color=c, marker="v", s=28,
               zorder=3)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/byte, log scale)")
  ax.set_title(title + "\nbold: held-out probe batch; faint: training loss "
               "(moving average); triangles: loss spikes", fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
