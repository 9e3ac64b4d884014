"""The report of a replay: per-method summary, table, CSV and plot."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence

import numpy as np

OPEN_LOOP = (
    "A replay is open loop: every method sees the norms the logged run "
    "produced. In a real run, clipping a step changes the gradients after "
    "it, so after a method's first clipped step the series is the one the "
    "unclipped run produced. The replay answers which steps each rule would "
    "have touched, and how hard, not what the loss would have been.")


def _methods_of(result: Mapping[str, np.ndarray]) -> list[str]:
  return [k[:-len("/threshold")] for k in result if k.endswith("/threshold")]


def summary_rows(result: Mapping[str, np.ndarray], warmup_end: int
                 ) -> list[dict]:
  """Per method: steps clipped, reductions, skips, and where they fall.

  ``warmup_end`` is the first step (by the result's ``"step"``) after the
  run's warm-up. The reduction of a clipped step is the norm before over
  the norm after (skipped steps are counted apart). ``capped`` is how many
  of the clips a fixed cap made (None for a method without one).
  """
  g = np.asarray(result["grad_norm"], np.float64)
  step = np.asarray(result["step"])
  early = step < warmup_end
  rows = []
  for m in _methods_of(result):
    out = np.asarray(result[f"{m}/out_norm"], np.float64)
    clipped = np.asarray(result[f"{m}/clipped"], bool)
    skipped = result.get(f"{m}/skipped")
    skipped = (np.zeros_like(clipped) if skipped is None
               else np.asarray(skipped, bool))
    cut = clipped & ~skipped & (out > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
      factor = g[cut] / out[cut]
    touched = clipped | skipped
    capped = result.get(f"{m}/capped")
    rows.append({
        "method": m, "clipped": int(clipped.sum()),
        "capped": None if capped is None else int(np.sum(capped)),
        "clipped_pct": 100.0 * clipped.mean(),
        "largest": float(factor.max()) if factor.size else None,
        "median": float(np.median(factor)) if factor.size else None,
        "skipped": int(skipped.sum()) if f"{m}/skipped" in result else None,
        "warmup": int((touched & early).sum()),
        "later": int((touched & ~early).sum())})
  return rows


def cap_note(row: dict, cap: float, alone: str, median: float) -> str | None:
  """One sentence when a ZClip method's cap made most of its clips (a run
  whose norms sit above the cap), naming the spec without the cap; None
  otherwise. ``median`` is the median finite norm of the log."""
  made = row["clipped"] - (row["skipped"] or 0)
  if row["capped"] is None or not made or 2 * row["capped"] <= made:
    return None
  above = ", above the cap" if median > cap else ""
  return (f"the cap max_grad_norm={cap:g} made {row['capped']} of "
          f"{row['method']}'s {made} clips (the median norm is "
          f"{median:.3g}{above}), and its z-score rule "
          f"{made - row['capped']}: replay {alone} to see the adaptive rule "
          "alone")


def format_table(rows: list[dict]) -> str:
  """The per-method table the command prints."""
  head = ["method", "clipped", "by the cap", "largest cut", "median cut",
          "skipped", "in warm-up", "later"]
  body = []
  for r in rows:
    body.append([
        r["method"], f"{r['clipped']} ({r['clipped_pct']:.1f}%)",
        "-" if r["capped"] is None else str(r["capped"]),
        "-" if r["largest"] is None else f"{r['largest']:.2f}x",
        "-" if r["median"] is None else f"{r['median']:.2f}x",
        "-" if r["skipped"] is None else str(r["skipped"]),
        str(r["warmup"]), str(r["later"])])
  widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(x, widths, strict=True)))
           for x in [head, *body]]
  return "\n".join(lines)


def write_csv(path: str, result: Mapping[str, np.ndarray]) -> None:
  """``result`` as a CSV: a header of its keys, one row per step, flags 0/1,
  floats in their shortest exact form."""
  columns = []
  for v in result.values():
    v = np.asarray(v)
    if v.dtype == bool:
      columns.append(np.where(v, "1", "0"))
    else:
      columns.append(v.astype(str))
  with open(path, "w", newline="") as f:
    csv.writer(f, lineterminator="\n").writerow(list(result))
    f.writelines(",".join(cells) + "\n"
                 for cells in zip(*columns, strict=True))


def plot(path: str, result: Mapping[str, np.ndarray],
         losses: Sequence[float | None] | None = None,
         title: str = "") -> None:
  """The replay as a figure, written to ``path``.

  Top: the logged norm on a log axis and each method's threshold. Middle:
  one row per method, a tick at each step it clipped and a cross at each
  step it skipped. Bottom, when ``losses`` are given: the loss, with the
  skipped steps crossed. Needs matplotlib, imported here (the package does
  not need it).
  """
  import matplotlib  # noqa: F401, PLC0415 (optional: fails without it)
  from matplotlib.figure import Figure  # noqa: PLC0415

  step = np.asarray(result["step"])
  g = np.asarray(result["grad_norm"], np.float64)
  methods = _methods_of(result)
  loss = (None if losses is None else
          np.array([np.nan if v is None else v for v in losses], np.float64))
  ratios = [3.0, 0.35 + 0.22 * len(methods)] + ([1.3] if loss is not None
                                                else [])
  fig = Figure(figsize=(11, 1.3 * sum(ratios) + 0.8), layout="constrained")
  axes = fig.subplots(len(ratios), 1, sharex=True, height_ratios=ratios)
  ax, ax_ev = axes[0], axes[1]
  finite = np.isfinite(g) & (g > 0)
  ax.plot(step, np.where(finite, g, np.nan), color="0.55", lw=0.7,
          label="logged norm")
  for i, m in enumerate(methods):
    color = f"C{i % 10}"
    thr = np.asarray(result[f"{m}/threshold"], np.float64)
    ax.plot(step, np.where(np.isfinite(thr) & (thr > 0), thr, np.nan),
            color=color, lw=1.3, ls=("-", "--", "-.", ":")[i % 4],
            label=f"{m}: threshold")
    skipped = np.asarray(result.get(f"{m}/skipped", np.zeros(len(g), bool)),
                         bool)
    clipped = np.asarray(result[f"{m}/clipped"], bool) & ~skipped
    y = len(methods) - 1 - i
    ax_ev.scatter(step[clipped], np.full(clipped.sum(), y), marker="|",
                  s=80, lw=1.0, color=color)
    ax_ev.scatter(step[skipped], np.full(skipped.sum(), y), marker="x",
                  s=30, lw=1.2, color=color)
    if loss is not None and skipped.any():
      axes[2].scatter(step[skipped], loss[skipped], marker="x", s=30,
                      lw=1.2, color=color, zorder=3,
                      label=f"{m}: skipped")
  bad = ~np.isfinite(g)
  if bad.any():
    for a in axes:
      for t in step[bad]:
        a.axvline(t, color="red", lw=0.6, alpha=0.5)
    ax.plot([], [], color="red", lw=0.6, label="NaN/Inf norm")
  ax.set_yscale("log")
  ax.set_ylabel("global gradient norm")
  ax.grid(alpha=0.3, which="both", lw=0.4)
  ax.legend(fontsize="small", ncols=2 if len(methods) > 2 else 1,
            loc="upper right")
  if title:
    ax.set_title(title, fontsize="medium")
  ax_ev.set_yticks(range(len(methods)),
                   [f"{m}  ({int(np.sum(result[f'{m}/clipped']))})"
                    for m in reversed(methods)], fontsize="small")
  ax_ev.set_ylim(-0.7, len(methods) - 0.3)
  ax_ev.set_title("steps clipped (|) and skipped (x), per method (clipped "
                  "count)", fontsize="small", loc="left")
  ax_ev.grid(alpha=0.3, axis="x", lw=0.4)
  if loss is not None:
    axes[2].plot(step, loss, color="0.3", lw=0.7)
    axes[2].set_ylabel("loss")
    axes[2].grid(alpha=0.3, lw=0.4)
    if axes[2].collections:
      axes[2].legend(fontsize="small", loc="upper right")
  axes[-1].set_xlabel("step")
  fig.savefig(path, dpi=110)
