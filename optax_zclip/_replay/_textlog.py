"""Text logs: lines of ``key: value`` pairs (Megatron-LM, torchtitan, llm.c,
fairseq) or of printed dicts (the Hugging Face Trainer's console, fairseq's
JSON), possibly behind a launcher's rank prefix."""

from __future__ import annotations

import ast
import json
import re

from optax_zclip._replay._formats import _flatten, _Table

TEXT_LOG = "text log"
# Colour and cursor codes (torchtitan colours its fields).
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# A launcher's prefix naming the process: torchrun's "[default3]:" (--tee:
# role and local rank) or "[rank0]:", OpenMPI's "[1,0]<stdout>:".
_RANK = re.compile(r"\s*(?:\[[A-Za-z][A-Za-z_-]*?(\d+)\]:"
                   r"|\[\d+,(\d+)\]<std(?:out|err)>:)")
# A bracketed prefix such as a timestamp, "[2025-01-01 12:00:00]".
_PREFIX = re.compile(r"^\s*\[[^\]]*\]\s*")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)"
# One-word keys: "step: 1", "loss=2.5", "norm:14.96" (llm.c's "s:0").
_PAIR = re.compile(rf"(?<![\w.\-/])([A-Za-z_][\w./-]*)\s*[:=]\s*({_NUMBER})"
                   r"(?![\w.])", re.IGNORECASE)
# A field of a "|"-separated line (Megatron-LM): a key of several words, then
# a colon or a space, then the value; "iteration 100/ 500000" gives 100.
_FIELD = re.compile(rf"^([A-Za-z][A-Za-z0-9 _()./-]*?)\s*(?::\s*|\s+)"
                    rf"({_NUMBER})(?:\s*/\s*\d+)?$", re.IGNORECASE)
# A dict that ends the line, as Python prints one (the Hugging Face
# Trainer's {'loss': '1.921', 'grad_norm': ...}) or as JSON (fairseq's
# "| train_inner | {...}"): from its first "{" and a quoted key on.
_DICT = re.compile(r"\{\s*['\"].*\}\s*$")
# What `ast.literal_eval` cannot read in a printed dict: numbers wrapped in
# numpy's or torch's repr, and bare nan and inf.
_WRAPPED = re.compile(r"\b(?:np|numpy)\.\w+\(\s*([^()]*?)\s*\)"
                      r"|\btensor\(\s*([^(),]*?)\s*(?:,[^()]*)?\)")
_BARE = re.compile(r"([:,\[]\s*)([-+]?(?:nan|inf(?:inity)?))(?=\s*[,}\]])",
                   re.IGNORECASE)
# fairseq's progress tags: "train_inner" lines are its steps; "train" and
# "valid" lines (also "| epoch 001 | ..." without a tag) close an epoch with
# its means and repeat the last step's num_updates.
_TAG = re.compile(r"(?:^|\|)\s*(train_inner|train|valid|test)\s*(?=\|)"
                  r"|\[(train_inner|train|valid|test)\]")
_INNER = re.compile(r"^epoch \d+:")
_EPOCH = re.compile(r"^epoch \d+$")
# A line counts as a step of a text log when it holds one of these steps...
STEP_KEYS = ("step", "iteration", "iter", "s", "global_step", "num_updates",
             "global_step/max_steps")


def _dict(text: str) -> dict | None:
  """The printed dict that ends ``text``, flattened; None if there is none."""
  m = _DICT.search(text)
  if not m:
    return None
  source = m.group()
  try:
    obj = json.loads(source)
  except ValueError:
    source = _WRAPPED.sub(lambda w: w.group(1) or w.group(2), source)
    try:
      obj = ast.literal_eval(_BARE.sub(r"\1'\2'", source))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
      return None
  if not isinstance(obj, dict):
    return None
  return {k: v for k, v in _flatten(obj).items() if isinstance(k, str)}


def _fields(line: str) -> tuple[dict, str]:
  """The pairs of a "|"-separated line and its kind: "inner" or "summary"
  for fairseq's lines, "" for others."""
  out = {}
  kind = ""
  for field in line.split("|"):
    field = field.strip()
    if "=" in field:  # fairseq: "epoch 001:   100 / 1563 loss=9.8, ..."
      out.update(_PAIR.findall(field))
      kind = "inner" if _INNER.match(field) else kind
      continue
    m = _FIELD.match(field)
    if m:
      out[" ".join(m.group(1).split())] = m.group(2)
    elif field.startswith("epoch ") and _EPOCH.match(field):
      kind = kind or "summary"
  return out, kind


def _parse(line: str) -> tuple[dict, int | None, str]:
  """A line's pairs, the rank its launcher's prefix names (None without
  one), and its kind (see `_fields`)."""
  line = _ANSI.sub("", line)
  rank = None
  m = _RANK.match(line)
  if m:
    rank = int(m.group(1) or m.group(2))
    line = line[m.end():]
  found, kind = {}, ""
  # A progress bar rewrites itself after "\r": a dict can follow on the same
  # line, so each part is read.
  for part in line.split("\r"):
    part = _PREFIX.sub("", part).strip()
    if not part or part[0] in "\"#":
      continue
    tag = ("train" in part or "valid" in part or "test" in part) and (
        _TAG.search(part))
    if tag:
      kind = "inner" if "train_inner" in tag.groups() else "summary"
    printed = _dict(part) if "{" in part else None
    if printed is not None:
      found.update(printed)
    elif part[0] == "{":
      continue
    elif part.count("|") >= 2:
      pairs, fairseq = _fields(part)
      found.update(pairs)
      kind = kind or fairseq
    else:
      found.update(_PAIR.findall(part))
  return found, rank, kind


def _is_norm(key: str) -> bool:
  return key.lower().replace(" ", "_").endswith("norm")


def _lines(text: str) -> list[str]:
  """The lines of ``text``, split at newlines only: a carriage return
  rewrites a progress bar within its line."""
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


def looks_like(text: str) -> bool:
  """Whether ``text`` is a text log: one of its lines holds a step, a norm
  or a loss as pairs (a CSV or a column of numbers never does)."""
  for line in _lines(text):
    for key in _parse(line)[0]:
      if key in STEP_KEYS or _is_norm(key) or "loss" in key.lower():
        return True
  return False


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def read(path: str, text: str) -> _Table:
  """Every line as a row of its pairs, columns in order of appearance;
  `read_log` keeps the rows that hold a norm (and a step, where the log
  has steps). Where a launcher prefixed the lines with ranks, the lowest
  rank that logged norms is read; fairseq's epoch summaries are left out
  where its steps are there."""
  norm_keys: dict[str, bool] = {}

  def has_norm(found: dict) -> bool:
    for key in found:
      if key not in norm_keys:
        norm_keys[key] = _is_norm(key)
      if norm_keys[key]:
        return True
    return False

  # (where, pairs, rank, kind, whether a pair is a norm)
  parsed = [(f"{path} line {n}", found, rank, kind, has_norm(found))
            for n, (found, rank, kind) in enumerate(map(_parse, _lines(text)),
                                                   1)]
  notes = []
  normed = [(rank, kind) for *_, rank, kind, norm in parsed if norm]
  ranks = sorted({r for r, _ in normed if r is not None})
  rank = ranks[0] if ranks else None
  if rank is not None:
    others = sum(p[2] not in (None, rank) for p in parsed)
    parsed = [p for p in parsed if p[2] in (None, rank)]
    said = (f"{len(ranks)} ranks logged norms ({', '.join(map(str, ranks))}"
            f"): rank {rank}'s lines are read" if len(ranks) > 1 else
            f"the norms are rank {rank}'s lines")
    notes.append(f"the lines carry a launcher's rank prefix; {said}"
                 + (f", the {_count(others, 'line')} of other ranks left out"
                    if others else ""))
  summaries = 0
  if any(kind == "inner" for _, kind in normed):
    summaries = sum(p[3] == "summary" and p[4] for p in parsed)
    parsed = [p for p in parsed if not (p[3] == "summary" and p[4])]
  if summaries:
    notes.append(f"left out {_count(summaries, 'epoch summary line')} "
                 "(fairseq's train lines: the epoch's means, at the step of "
                 "its last train_inner line)")
  columns: dict[str, None] = {}
  for p in parsed:
    columns.update(dict.fromkeys(p[1]))
  table = _Table(TEXT_LOG, list(columns), [p[:2] for p in parsed])
  table.notes, table.rank, table.summaries = notes, rank, summaries
  return table
