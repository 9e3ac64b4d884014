"""A log's series to replay: its format found, its columns chosen, checked."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from optax_zclip._replay import _formats, _steps, _tensorboard, _textlog
from optax_zclip._replay._formats import LogError, _Table

# The norm before clipping wherever a log has it and another: MaxText's
# `learning/raw_grad_norm` before its `learning/grad_norm` (after clipping,
# last), and `skip_spikes`'s before the clipping transforms': it is every
# step's norm, while a clipping transform inside `skip_spikes` keeps the last
# taken step's on a skipped step, hiding the very spikes. Megatron-LM logs
# `grad norm`, torchtitan `grad_norm`, llm.c `norm`, all before clipping.
NORM_NAMES = ("learning/raw_grad_norm", "grad_norm", "train/grad_norm",
              "gradient_norm", "train/gradient_norm", "grad norm",
              "grad_2.0_norm_total", "gnorm", "skip/grad_norm",
              "zclip/grad_norm", "clip/grad_norm", "autoclip/grad_norm",
              "adagc/grad_norm", "norm", "Value", "learning/grad_norm")
# Norms after clipping: the note says what that means for the replay.
POST_CLIP = ("learning/grad_norm",)
# The training loss: torchtitan's global mean (not its global_max_loss),
# Lightning's per-step train_loss_step (not train_loss_epoch).
LOSS_NAMES = ("loss", "train/loss", "train_loss", "train_loss_step",
              "lm loss", "loss_metrics/global_avg_loss", "learning/loss",
              "trl")
# ms-swift's "global_step/max_steps" is "12/2353"; fairseq counts updates;
# LLaMA-Factory's trainer_log.jsonl has current_steps.
STEP_NAMES = ("step", "_step", "Step", "global_step", "global_step/max_steps",
              "train/global_step", "trainer/global_step", "num_updates",
              "iteration", "current_steps", "s")
# A norm's column, by its end, where the log has no name above: a framework's
# prefix ("train/", a run's name) before grad_norm, or Lightning's total of
# grad_norm(model, 2) (its per-tensor "grad_2.0_norm/<name>" are not).
_NORM_ENDINGS = ("grad_norm", "grad_2.0_norm_total")
# "12/2353": step 12 of 2353.
_OF = re.compile(r"\s*(\d+)\s*/\s*\d+\s*$")


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
  relogged: int = 0  # steps logged again (a restart): the last write is read
  rank: int | None = None  # the rank read, where a launcher named ranks
  numbered: bool = False  # no step in the log: the norms numbered from 0
  summaries_left_out: int = 0  # summary rows or lines, not steps


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
  # JSON lines first: their lines are dicts, which a text log may hold too.
  if not text.lstrip().startswith("{") and _textlog.looks_like(text):
    return _textlog.read(path, text)
  try:
    return _formats.read_text(path, text)
  except _formats.NotJson:
    if _textlog.looks_like(text):  # printed dicts: a trainer's console
      return _textlog.read(path, text)
    raise


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
  return [c for c in columns if c.endswith(_NORM_ENDINGS) or c in NORM_NAMES]


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


def _filled(raw: Any) -> bool:
  return raw is not None and not (isinstance(raw, str) and not raw.strip())


def _pick(table: _Table, given: str | None, names: Sequence[str],
          what: str, option: str, path: str,
          with_norms: Callable[[str], bool] = bool) -> str | None:
  """The column to read: the one given (checked), else a known name; for
  the loss and the step, the first with values on the rows that hold norms
  (a Megatron-DeepSpeed log has DeepSpeed's own "loss" and "step" lines,
  without a norm, beside Megatron's "lm loss" and "iteration")."""
  if given is not None:
    if given not in table.columns:
      raise LogError(f"{path} has no column {given!r} ({option}); its "
                     f"columns: {', '.join(table.columns) or '(none)'}")
    return given
  present = [name for name in names if name in table.columns]
  if what != "norm":
    for name in present:
      if with_norms(name):
        return name
    # A loss column without values: the report says so. Steps: numbered.
    return present[0] if present and what == "loss" else None
  if present:
    return present[0]
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

  def with_norms(column: str) -> bool:  # a value on a row with a norm
    return any(_filled(row.get(column)) and _filled(row.get(norm_col))
               for _, row in table.rows)

  loss_col = _pick(table, loss_column, LOSS_NAMES, "loss", "--loss-column",
                   path, with_norms)
  step_col = _pick(table, step_column, STEP_NAMES, "step", "--step-column",
                   path, with_norms)
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
      steps.append(_step(row.get(step_col), w, step_col))
  left_out = len(table.rows) - len(norms)
  relogged = set(table.rewritten.get(norm_col, ()))
  if steps:
    keep, again = _steps.last_writes(steps)
    relogged |= again
    if keep is not None:
      norms, wheres, steps = ([x[i] for i in keep]
                              for x in (norms, wheres, steps))
      losses = [losses[i] for i in keep] if loss_col else losses
  log = _finish(path, table, norm_col, loss_col, step_col, norms,
                losses if loss_col else None, steps if step_col else None,
                wheres)
  log.left_out = left_out
  log.rank, log.summaries_left_out = table.rank, table.summaries
  log.relogged, log.numbered = len(relogged), step_col is None
  if norm_column is None:
    log.notes[:0] = _norm_note(norm_col, table.columns)
  if norm_col in POST_CLIP:
    log.notes.insert(0, f"column {norm_col!r} is the norm after clipping: a "
                     "clipping rule replayed on it cannot see what the run's "
                     "clipping took away, so steps it clipped look ordinary")
  log.notes += table.notes
  if relogged:
    log.notes.append(_steps.relogged_note(relogged, int(log.steps[0])))
  if log.numbered and text_log:  # a table says so in its first line
    n = len(log.norms)
    log.notes.append(
        f"the lines give no step: the {n} norms are numbered 0 to {n - 1} in "
        "the order of the file (a trainer that logs every k steps gives a "
        "norm per k steps; steps a restart logs again cannot be told apart, "
        "and are replayed twice)")
  return log


def _step(raw: Any, where: str, column: str) -> int:
  """A row's step: a whole number, or n of "n/N"."""
  if isinstance(raw, str):
    m = _OF.match(raw)
    if m:
      return int(m.group(1))
  s = _number(raw, where, column)
  if s is None:
    raise LogError(f"{where}: a norm without a step in column {column!r}")
  if not float(s).is_integer():
    raise LogError(f"{where}: column {column!r} holds {s!r}, not a whole "
                   "step number")
  return int(s)


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
    notes += _steps.step_notes(step)
  if losses is not None and all(v is None for v in losses):
    losses = None
  return _Log(table.fmt, table.columns, norm_col, loss_col, step_col, step,
              g, losses, len(norms) - len(kept), notes)
