"""A log's steps: a step logged again (a restart) and what the report says
of the steps (gaps, a subsampled series)."""

from __future__ import annotations

import numpy as np


def last_writes(steps: list[int]) -> tuple[np.ndarray | None, set[int]]:
  """The rows to replay, each step's last, in step order (None: all, as
  they are), and the steps written more than once. A step logged again
  belongs to the run resumed from a checkpoint, whose values replaced the
  first run's."""
  s = np.asarray(steps, np.int64)
  if np.all(np.diff(s) > 0):
    return None, set()
  unique, first, counts = np.unique(s[::-1], return_index=True,
                                    return_counts=True)
  return len(s) - 1 - first, set(unique[counts > 1].tolist())


def relogged_note(relogged: set[int], first: int) -> str:
  """The report's note on the steps logged again; ``first``: the first step
  replayed."""
  n = len(relogged)
  why = "a restart from a checkpoint"
  if min(relogged) == first:  # from the very first step: maybe another run
    why += ", or a second run in this log: --where COLUMN=VALUE keeps one"
  return (f"{n} {'step was' if n == 1 else 'steps were'} logged again "
          f"({why}): the last write of each is replayed")


def step_notes(steps: np.ndarray) -> list[str]:
  """What the report says of steps in order, each once: nothing for
  consecutive steps, else that the series is subsampled or has gaps."""
  n = len(steps)
  if n < 2:
    return []
  d = np.diff(steps)
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
