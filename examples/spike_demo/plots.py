"""The demo's two figures: loss and gradient norm of every method."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"none": "tab:red", "clip": "tab:orange", "zclip": "tab:blue",
          "adagc": "tab:green", "autoclip": "tab:purple"}
LABELS = {"none": "no clipping", "clip": "clip_by_global_norm",
          "zclip": "ZClip", "adagc": "AdaGC", "autoclip": "AutoClip"}


def _ema(x: np.ndarray, alpha: float = 0.9) -> np.ndarray:
  out, acc = np.empty_like(x), x[0]
  for i, v in enumerate(x):
    acc = alpha * acc + (1 - alpha) * v
    out[i] = acc
  return out


def series(rows: list[dict], key: str) -> np.ndarray:
  """``key`` of every row as a float array, None as NaN."""
  return np.array([np.nan if r[key] is None else r[key] for r in rows], float)


def plot_loss(runs: dict[str, list[dict]], spikes: dict[str, np.ndarray],
              counts: dict[str, int], path: pathlib.Path, title: str) -> None:
  """Training loss (faint, EMA) and probe loss (bold); loss spikes marked."""
  fig, ax = plt.subplots(figsize=(9, 5))
  for method, rows in runs.items():
    steps, probe = series(rows, "step"), series(rows, "probe_loss")
    c = COLORS.get(method)
    ax.plot(steps, _ema(series(rows, "loss")), color=c, alpha=0.3, lw=0.8)
    ax.plot(steps, probe, color=c, lw=1.6,
            label=f"{LABELS.get(method, method)} ({counts[method]} spike"
            f"{'' if counts[method] == 1 else 's'})")
    flagged = spikes[method]
    ax.scatter(steps[flagged], probe[flagged], color=c, marker="v", s=28,
               zorder=3)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/byte, log scale)")
  ax.set_title(title + "\nbold: held-out probe batch; faint: training loss "
               "(moving average)", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_grad_norm(runs: dict[str, list[dict]], path: pathlib.Path,
                   title: str) -> None:
  """Gradient norm before (top) and after (bottom) clipping, log scale."""
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                    sharey=True)
  for method, rows in runs.items():
    steps = series(rows, "step")
    c, label = COLORS.get(method), LABELS.get(method, method)
    top.plot(steps, series(rows, "grad_norm"), color=c, lw=0.8, label=label)
    bottom.plot(steps, series(rows, "clipped_norm"), color=c, lw=0.8,
                label=label)
    thr = series(rows, "threshold")
    if method == "zclip" and np.isfinite(thr).any():
      bottom.plot(steps, thr, color=c, lw=0.8, ls=":",
                  label="ZClip threshold (mean + z_thresh * std)")
  top.set_title(title)
  top.set_ylabel("gradient norm before clipping")
  bottom.set_ylabel("after clipping")
  bottom.set_xlabel("step")
  for ax in (top, bottom):
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
  top.legend(fontsize=8)
  bottom.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

