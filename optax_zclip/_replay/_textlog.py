"""Text logs of ``key: value`` pairs: Megatron-LM, torchtitan, llm.c, ..."""

from __future__ import annotations

import re

from optax_zclip._replay._formats import _Table

TEXT_LOG = "text log"
# Colour and cursor codes (torchtitan colours its fields).
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
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
# A line counts as a step of a text log when it holds one of these steps...
STEP_KEYS = ("step", "iteration", "iter", "s", "global_step")


def pairs(line: str) -> dict[str, str]:
  """The ``key: value`` pairs of one line, values as the text gives them."""
  line = _PREFIX.sub("", _ANSI.sub("", line)).strip()
  if not line or line[0] in "{\"#":
    return {}
  if line.count("|") >= 2:
    out = {}
    for field in line.split("|"):
      m = _FIELD.match(field.strip())
      if m:
        out[" ".join(m.group(1).split())] = m.group(2)
    return out
  return {k: v for k, v in _PAIR.findall(line)}


def _is_norm(key: str) -> bool:
  return key.lower().replace(" ", "_").endswith("norm")


def looks_like(text: str) -> bool:
  """Whether ``text`` is a text log: one of its lines holds a step and a
  norm as pairs (a CSV, JSON or a column of numbers never does)."""
  for line in text.splitlines():
    found = pairs(line)
    if any(k in STEP_KEYS for k in found) and any(map(_is_norm, found)):
      return True
  return False


def read(path: str, text: str) -> _Table:
  """Every line as a row of its pairs, columns in order of appearance;
  `read_log` keeps the rows that hold a step and a norm."""
  columns: dict[str, None] = {}
  rows = []
  for n, line in enumerate(text.splitlines(), 1):
    found = pairs(line)
    columns.update(dict.fromkeys(found))
    rows.append((f"{path} line {n}", found))
  return _Table(TEXT_LOG, list(columns), rows)
