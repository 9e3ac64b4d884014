"""The text formats of logs: CSV/TSV, JSON (lines), `trainer_state.json`."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable


class LogError(ValueError):
  """A log the command cannot replay; the message is one line."""


class NotJson(LogError):
  """A log that starts like JSON but has a line that is not."""


@dataclasses.dataclass
class _Table:
  """A log's rows, each a mapping from column to its raw value."""

  fmt: str
  columns: list[str]
  rows: list[tuple[str, dict]]  # (where it is in the file, values)
  # What reading it did, for the report: sentences, the rank whose lines
  # were read (a launcher's prefix), summaries left out, and per column the
  # steps written more than once that the reader merged (TensorBoard).
  notes: list[str] = dataclasses.field(default_factory=list)
  rank: int | None = None
  summaries: int = 0
  rewritten: dict[str, set] = dataclasses.field(default_factory=dict)


# The keys of a summary object ending a JSON lines log (ms-swift's
# logging.jsonl, after its steps): not a step.
_SUMMARY = frozenset(("log_history", "last_model_checkpoint",
                      "best_model_checkpoint"))


def _flatten(obj: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in obj.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _json_rows(path: str, objs: list, where: Callable[[int], str]) -> _Table:
  rows, columns = [], {}
  for i, obj in enumerate(objs):
    if not isinstance(obj, dict):
      raise LogError(f"{where(i)} is not a JSON object")
    flat = _flatten(obj)
    columns.update(dict.fromkeys(flat))
    rows.append((where(i), flat))
  return _Table("", list(columns), rows)


def read_text(path: str, text: str) -> _Table | None:
  """The rows of a text log in one of these formats, recognised by its
  content; None for a text this module does not read (a text log of
  ``key: value`` pairs)."""
  body = text.lstrip()
  if body[0] in "{[":
    try:
      obj = json.loads(text)
    except json.JSONDecodeError:
      obj = None  # JSON lines
    if isinstance(obj, dict) and "log_history" in obj:
      history = obj["log_history"]
      if not isinstance(history, list):
        raise LogError(f"{path}: log_history is not a list")
      table = _json_rows(path, history, lambda i: f"{path} log_history[{i}]")
      table.fmt = "Hugging Face trainer_state.json"
      return table
    if isinstance(obj, dict) and "\n" in text.strip():
      raise LogError(f"{path} is a JSON object without log_history (not a "
                     "Hugging Face trainer_state.json, nor JSON lines)")
    if isinstance(obj, list):
      table = _json_rows(path, obj, lambda i: f"{path} item {i}")
      table.fmt = "JSON"
      return table
    objs, lines, summaries = [], [], 0
    for n, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise NotJson(f"{path} line {n} is not JSON ({e.msg})") from None
        if isinstance(obj, dict) and not _SUMMARY.isdisjoint(obj):
          summaries += 1  # its keys are no columns: no step is there
          continue
        objs.append(obj)
        lines.append(n)
    table = _json_rows(path, objs, lambda i: f"{path} line {lines[i]}")
    table.fmt = "JSON lines"
    if summaries:
      table.summaries = summaries
      table.notes.append(
          f"left out {summaries} summary "
          f"{'object' if summaries == 1 else 'objects'} (the run's last "
          "line, with its checkpoints or log history, no step's norm)")
    return table
  lines = text.splitlines()
  first = next(line.strip() for line in lines
               if line.strip() and not line.lstrip().startswith("#"))
  try:
    float(first)
  except ValueError:
    pass
  else:
    rows = []
    for n, line in enumerate(lines, 1):
      t = line.strip()
      if t and not t.startswith("#"):
        rows.append((f"{path} line {n}", {"": t}))
    return _Table("one number per line", [], rows)
  delimiter = "\t" if "\t" in first and "," not in first else ","
  reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
  header = [c.strip() for c in next(reader)]
  notes = []
  run = _one_run(header)
  if run is not None:
    header = [c.partition(" - ")[2] if " - " in c else c for c in header]
    notes.append(f"the columns are named '<run> - <metric>' (a W&B chart "
                 f"export) with one run, {run!r}: read by their metric")
  rows = []
  for cells in reader:
    if not any(c.strip() for c in cells):
      continue
    where = f"{path} line {reader.line_num}"
    if len(cells) > len(header):
      raise LogError(f"{where} has {len(cells)} values for {len(header)} "
                     "columns")
    rows.append((where, dict(zip(header, cells, strict=False))))
  return _Table("CSV", header, rows, notes)


def _one_run(header: list[str]) -> str | None:
  """The run of a W&B chart export's columns, "<run> - <metric>", where
  they name one run and stripping it leaves the names distinct."""
  runs = {c.partition(" - ")[0] for c in header if " - " in c}
  if len(runs) != 1:
    return None
  names = [c.partition(" - ")[2] if " - " in c else c for c in header]
  return runs.pop() if len(set(names)) == len(names) else None


