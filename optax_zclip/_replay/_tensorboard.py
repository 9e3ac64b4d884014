"""TensorBoard event files and run directories, read with `tensorboard`."""

from __future__ import annotations

import os

from optax_zclip._replay._formats import LogError, _Table

TENSORBOARD = "TensorBoard"
_EXTRA = 'pip install "optax-zclip[tensorboard]"'


def is_event_file(path: str) -> bool:
  """Whether ``path`` is a TensorBoard event file, by its content: a record
  of a TFRecord file whose first event names the event format."""
  try:
    with open(path, "rb") as f:
      head = f.read(64)
  except OSError:
    return False
  return b"brain.Event:" in head


def event_files(path: str) -> list[str]:
  """The event files of a run directory, all levels below it included, in
  the order of their names (TensorBoard's names start with a timestamp)."""
  found = []
  for root, _, names in os.walk(path):
    found += [os.path.join(root, n) for n in names
              if is_event_file(os.path.join(root, n))]
  return sorted(found, key=os.path.basename)


def _scalar(value, tensor_util) -> float | None:
  """A summary value's scalar, whether written as ``simple_value``
  (tensorboardX, TF1) or as a 0-d tensor (``tf.summary.scalar`` in TF2)."""
  if value.HasField("simple_value"):
    return float(value.simple_value)
  if value.HasField("tensor"):
    array = tensor_util.make_ndarray(value.tensor)
    if array.ndim == 0 and array.dtype.kind in "fiu":
      return float(array)
  return None


def read(path: str) -> _Table:
  """The scalars of an event file, or of every event file of a run
  directory, one row per step with a column per tag; where a step has a
  tag twice (a restart wrote it again), the last written value wins."""
  files = event_files(path) if os.path.isdir(path) else [path]
  if not files:
    raise LogError(f"{path} is a directory without TensorBoard event files "
                   "(events.out.tfevents.*); give a log file or a run "
                   "directory")
  try:
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.util import tensor_util
  except ImportError:
    raise LogError(f"{path} is a TensorBoard log; reading it needs the "
                   f"tensorboard package: {_EXTRA}") from None
  events = []
  for name in files:
    events += list(event_file_loader.EventFileLoader(name).Load())
  by_step: dict[int, dict[str, float]] = {}
  tags: dict[str, None] = {}
  # Per tag, the steps written again: the report counts them as the other
  # readers count the steps a log repeats.
  rewritten: dict[str, set[int]] = {}
  for event in sorted(events, key=lambda e: e.wall_time):
    for value in event.summary.value:
      x = _scalar(value, tensor_util)
      if x is not None:
        values = by_step.setdefault(int(event.step), {})
        if value.tag in values:
          rewritten.setdefault(value.tag, set()).add(int(event.step))
        values[value.tag] = x
        tags[value.tag] = None
  rows = [(f"{path} step {step}", {"step": step, **values})
          for step, values in sorted(by_step.items())]
  table = _Table(TENSORBOARD, ["step", *tags], rows)
  table.rewritten = rewritten
  return table
