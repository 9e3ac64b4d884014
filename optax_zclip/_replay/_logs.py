"""A log's series to replay: its format found, its columns chosen, checked."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from optax_zclip._replay import _formats, _tensorboard, _textlog
from optax_zclip._replay._formats import LogError, _Table

# The norm before clipping wherever a log has it and another: MaxText's
# `learning/raw_grad_norm` before its `learning/grad_norm` (after clipping,
# last), and `skip_spikes`'s before the clipping transforms': it is every
# step's norm, while a clipping transform inside `skip_spikes` keeps the last
# taken step's on a skipped step, hiding the very spikes. Megatron-LM logs
# `grad norm`, torchtitan `grad_norm`, llm.c `norm`, all before clipping.
NORM_NAMES = ("learning/raw_grad_norm", "grad_norm", "train/grad_norm",
              "gradient_norm", "train/gradient_norm", "grad norm",
              "skip/grad_norm", "zclip/grad_norm", "clip/grad_norm",
              "autoclip/grad_norm", "adagc/grad_norm", "norm", "Value",
              "learning/grad_norm")
# Norms after clipping: the note says what that means for the replay.
POST_CLIP = ("learning/grad_norm",)
LOSS_NAMES = ("loss", "train/loss", "train_loss", "lm loss", "learning/loss",
              "trl")
STEP_NAMES = ("step", "_step", "Step", "global_step", "train/global_step",
              "trainer/global_step", "iteration", "s")


@dataclasses.dataclass
class _Log:
  """The series a log holds, and where they came from."""

  fmt: str
  columns: list[str]
  norm_column: str | None
  loss_column: str | None
  step_column: str | None
  steps: np.ndarray
  norms: np.ndarray
  losses: list | None  # a float or None per step
  left_out: int  # rows without a norm
  notes: list[str]


def _read_table(path: str) -> _Table:
  """Reads a log into rows, recognising its format by its content."""
  if not os.path.exists(path):
    raise LogError(f"{path}: no such file")
  if os.path.isdir(path) or _tensorboard.is_event_file(path):
    return _tensorboard.read(path)
  try:
    with open(path, encoding="utf-8", newline="") as f:
      text = f.read()
  except UnicodeDecodeError:
    raise LogError(f"{path} is not a text file (UTF-8)") from None
  except OSError as e:
    raise LogError(f"{path}: {e.strerror}") from None
  if not text.strip():
    raise LogError(f"{path} is empty")
  if _textlog.looks_like(text):
    return _textlog.read(path, text)
  return _formats.read_text(path, text)


def _number(raw: Any, where: str, column: str) -> float | None:
  """A cell as a float; None for an empty cell (a value not logged)."""
  if raw is None:
    return None
  if isinstance(raw, (int, float)) and not isinstance(raw, bool):
    return float(raw)
  if isinstance(raw, str):
    if not raw.strip():
      return None
    try:
      return float(raw)
    except ValueError:
      pass
  label = f"column {column!r} holds" if column else "holds"
  raise LogError(f"{where}: {label} {raw!r}, not a number")


def _norm_like(columns: Sequence[str]) -> list[str]:
  """The columns that could hold a gradient norm, in the file's order."""
  return [c for c in columns if c.endswith("grad_norm") or c in NORM_NAMES]


def _norm_note(chosen: str, columns: Sequence[str]) -> list[str]:
  """Which norm column was read when the log has others that could be."""
  others = [c for c in _norm_like(columns) if c != chosen]
  if not others:
    return []
  why = (" (skip_spikes's norm of every step, before clipping: a clipping "
         "transform inside skip_spikes logs the last taken step's norm on a "
         "skipped step)" if chosen == "skip/grad_norm" else "")
  return [f"the norms are column {chosen!r}{why}; the log also has "
          f"{', '.join(repr(c) for c in others)}: --norm-column to replay "
          "another"]


def _pick(table: _Table, given: str | None, names: Sequence[str],
          what: str, option: str, path: str) -> str | None:
  """The column to read: the one given (checked), else a known name."""
  if given is not None:
    if given not in table.columns:
      raise LogError(f"{path} has no column {given!r} ({option}); its "
                     f"columns: {', '.join(table.columns) or '(none)'}")
    return given
  for name in names:
    if name in table.columns:
      return name
  if what == "norm":
    ending = _norm_like(table.columns)
    if len(ending) == 1:
      return ending[0]
    if ending:
      raise LogError(f"{path}: {len(ending)} columns could be the gradient "
                     f"norm ({', '.join(ending)}); choose one with "
                     "--norm-column")
    raise LogError(f"{path}: no column looks like the gradient norm; give "
                   f"it with --norm-column (its columns: "
                   f"{', '.join(table.columns) or '(none)'})")
  return None


def _matches(raw: Any, want: str) -> bool:
  if raw is None:
    return False
  if isinstance(raw, bool):
    return want.lower() == str(raw).lower()
  if str(raw).strip() == want:
    return True
  try:
    return float(raw) == float(want)
  except (TypeError, ValueError):
    return False


def _step_notes(steps: np.ndarray, wheres: list[str]) -> list[str]:
  n = len(steps)
  if n < 2:
    return []
  d = np.diff(steps)
  back = np.flatnonzero(d <= 0)
  if back.size:
    i = back[0]
    return [f"the steps do not increase (step {steps[i + 1]} follows step "
            f"{steps[i]} at {wheres[i + 1]}); the rows are replayed in the "
            "order of the file"]
  if np.all(d == 1):
    return []
  if np.all(d == d[0]):
    return [f"a norm every {d[0]} steps: a subsampled series. It is replayed "
            f"as the {n} steps it has, one after another, so a method's "
            f"warm-up and windows span {d[0]} times as many training steps "
            "as in a run, and the steps between are not seen"]
  missing = int(steps[-1] - steps[0] + 1 - n)
  return [f"the steps have gaps ({n} norms over steps {steps[0]} to "
          f"{steps[-1]}, {missing} steps without one): they are replayed as "
          f"the {n} steps the log has, one after another"]


def read_log(path: str, norm_column: str | None = None,
             loss_column: str | None = None, step_column: str | None = None,
             where: Sequence[str] = ()) -> _Log:
  """Reads the series to replay from a log file; `LogError` if it cannot."""
  table = _read_table(path)
  if not table.columns:  # one number per line
    for option, value in (("--norm-column", norm_column),
                          ("--loss-column", loss_column),
                          ("--step-column", step_column)):
      if value is not None:
        raise LogError(f"{path} holds one number per line, without columns; "
                       f"leave out {option}")
    if where:
      raise LogError(f"{path} holds one number per line; leave out --where")
    norms = [_number(row[""], w, "") for w, row in table.rows]
    return _finish(path, table, None, None, None, norms, None, None,
                   [w for w, _ in table.rows])
  for cond in where:
    key, eq, want = cond.partition("=")
    if not eq:
      raise LogError(f"--where {cond!r}: expected COLUMN=VALUE")
    if key not in table.columns:
      raise LogError(f"{path} has no column {key!r} (--where); its columns: "
                     f"{', '.join(table.columns)}")
    table.rows = [r for r in table.rows if _matches(r[1].get(key), want)]
  if where and not table.rows:
    raise LogError(f"{path}: no row matches --where {' '.join(where)}")
  norm_col = _pick(table, norm_column, NORM_NAMES, "norm", "--norm-column",
                   path)
  loss_col = _pick(table, loss_column, LOSS_NAMES, "loss", "--loss-column",
                   path)
  step_col = _pick(table, step_column, STEP_NAMES, "step", "--step-column",
                   path)
  text_log = table.fmt == _textlog.TEXT_LOG
  norms, losses, steps, wheres = [], [], [], []
  for w, row in table.rows:
    if text_log and (row.get(norm_col) is None
                     or (step_col is not None and row.get(step_col) is None)):
      continue  # a line of other values: evaluation, a banner
    g = _number(row.get(norm_col), w, norm_col)
    if g is None:
      continue  # this row logged other values, not the norm
    norms.append(g)
    wheres.append(w)
    if loss_col is not None:
      losses.append(_number(row.get(loss_col), w, loss_col))
    if step_col is not None:
      s = _number(row.get(step_col), w, step_col)
      if s is None:
        raise LogError(f"{w}: a norm without a step in column {step_col!r}")
      if not float(s).is_integer():
        raise LogError(f"{w}: column {step_col!r} holds {s!r}, not a whole "
                       "step number")
      steps.append(int(s))
  left_out = len(table.rows) - len(norms)
  log = _finish(path, table, norm_col, loss_col, step_col, norms,
                losses if loss_col else None, steps if step_col else None,
                wheres)
  log.left_out = left_out
  if norm_column is None:
    log.notes[:0] = _norm_note(norm_col, table.columns)
  if norm_col in POST_CLIP:
    log.notes.insert(0, f"column {norm_col!r} is the norm after clipping: a "
                     "clipping rule replayed on it cannot see what the run's "
                     "clipping took away, so steps it clipped look ordinary")
  return log


def _finish(path, table, norm_col, loss_col, step_col, norms, losses, steps,
            wheres) -> _Log:
  kept = [(g, w) for g, w in zip(norms, wheres, strict=True) if g is not None]
  if not kept:
    what = f"column {norm_col!r}" if norm_col else "its lines"
    raise LogError(f"{path}: no norms to replay (no value in {what})")
  g = np.array([v for v, _ in kept], np.float64)
  bad = np.flatnonzero(g < 0)
  if bad.size:
    raise LogError(f"{kept[bad[0]][1]}: the norm {float(g[bad[0]])!r} is "
                   "negative")
  notes = []
  if steps is None:
    step = np.arange(len(g))
  else:
    step = np.array(steps, np.int64)
    notes += _step_notes(step, [w for _, w in kept])
  if losses is not None and all(v is None for v in losses):
    losses = None
  return _Log(table.fmt, table.columns, norm_col, loss_col, step_col, step,
              g, losses, len(norms) - len(kept), notes)
