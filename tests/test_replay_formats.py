"""The logs pretraining runs write, read for the replay: TensorBoard runs,
Megatron-LM, torchtitan and llm.c text logs.

Each sample is written here, in the shape those programs print or write it
(not copied from them), from a series the test knows; the replay must read
that series back, every logged step once, with the right columns chosen.
"""

import sys

import numpy as np
import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from optax_zclip import _cli
from optax_zclip._replay import _logs

STEPS = 40
BAD = 25


def _series(every=1, start=0):
  """(steps, pre-clip norms, losses): a bad batch at step BAD."""
  steps = np.arange(start, start + STEPS * every, every)
  rng = np.random.default_rng(3)
  norms = np.round(0.5 + 0.1 * rng.random(STEPS), 4)
  norms[steps == BAD * every] = 37.25
  losses = np.round(3.0 - 0.01 * np.arange(STEPS), 4)
  return steps, norms, losses


# --------------------------------------------------------------------------
# TensorBoard.


def _value(tag, x, as_tensor=False):
  if as_tensor:  # how TF2's tf.summary.scalar writes it
    return summary_pb2.Summary.Value(
        tag=tag, tensor=tensor_util.make_tensor_proto(np.float32(x)))
  return summary_pb2.Summary.Value(tag=tag, simple_value=x)


def _write_run(directory, rows, wall_start=0.0):
  """One event file: an event per (step, {tag: value}) row."""
  writer = EventFileWriter(str(directory))
  for i, (step, values) in enumerate(rows):
    writer.add_event(event_pb2.Event(
        step=int(step), wall_time=wall_start + i,
        summary=summary_pb2.Summary(value=[
            _value(tag, x, as_tensor=tag == "learning/loss")
            for tag, x in values.items()])))
  writer.close()


@pytest.fixture
def maxtext_run(tmp_path):
  """A run directory as MaxText writes it: the norm before clipping and
  after, the loss; a restart at step 30 wrote steps 30-34 again (later,
  with other values: those win), into a second event file."""
  steps, raw, losses = _series()
  run = tmp_path / "run"

  def values(t, scale=1.0):
    return {"learning/raw_grad_norm": raw[t] * scale,
            "learning/grad_norm": min(raw[t] * scale, 1.0),
            "learning/loss": losses[t]}

  _write_run(run / "a", [(steps[t], values(t)) for t in range(STEPS)])
  _write_run(run / "b", [(steps[t], values(t, 2.0)) for t in range(30, 35)],
             wall_start=1000.0)
  want = raw.copy()
  want[30:35] *= 2.0
  return run, steps, want, losses


def test_a_maxtext_run_directory_replays_the_raw_norm(maxtext_run, tmp_path,
                                                      capsys):
  run, steps, want, losses = maxtext_run
  log = _logs.read_log(str(run))
  assert log.fmt == "TensorBoard"
  assert (log.norm_column, log.loss_column, log.step_column) == (
      "learning/raw_grad_norm", "learning/loss", "step")
  np.testing.assert_array_equal(log.steps, steps)
  # simple_value is a float32.
  np.testing.assert_array_equal(log.norms, want.astype(np.float32))
  np.testing.assert_allclose(log.losses, losses, rtol=1e-6)
  assert "'learning/grad_norm'" in log.notes[0]

  out = tmp_path / "out"
  assert _cli.main(["replay", str(run), "--methods", "clip@1", "--out",
                    str(out), "--no-plot"]) == 0
  text = " ".join(capsys.readouterr().out.split())
  assert "norms from 'learning/raw_grad_norm'" in text
  replayed = np.loadtxt(out / "replay.csv", delimiter=",", skiprows=1)
  np.testing.assert_array_equal(replayed[:, 1], want.astype(np.float32))


def test_one_event_file_and_a_post_clip_norm_alone(tmp_path):
  steps, raw, _ = _series()
  _write_run(tmp_path, [(s, {"learning/grad_norm": min(g, 1.0)})
                        for s, g in zip(steps, raw, strict=True)])
  (event_file,) = tmp_path.iterdir()
  log = _logs.read_log(str(event_file))
  assert log.norm_column == "learning/grad_norm"
  np.testing.assert_array_equal(log.norms, np.minimum(raw, 1.0)
                                .astype(np.float32))
  assert log.notes[0].startswith("column 'learning/grad_norm' is the norm "
                                 "after clipping")


def test_tensorboard_without_the_package_names_the_extra(maxtext_run,
                                                         monkeypatch):
  for name in [m for m in sys.modules if m.split(".")[0] == "tensorboard"]:
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
  with pytest.raises(_logs.LogError, match=r"needs the tensorboard package: "
                     r'pip install "optax-zclip\[tensorboard\]"'):
    _logs.read_log(str(maxtext_run[0]))


def test_a_directory_without_event_files_is_refused(tmp_path):
  (tmp_path / "notes.txt").write_text("nothing here\n")
  with pytest.raises(_logs.LogError, match="is a directory without "
                     "TensorBoard event files"):
    _logs.read_log(str(tmp_path))


# --------------------------------------------------------------------------
# Text logs.


def _megatron(path):
  """Megatron-LM's training log: banners, an iteration line every 10 steps
  (fields separated by "|"), a validation line every 100."""
  steps, norms, losses = _series(every=10, start=10)
  lines = ["using world size: 8, data-parallel size: 8",
           "> building GPT model ...",
           " > number of parameters on (tensor, pipeline) model parallel "
           "rank (0, 0): 125000000"]
  for s, g, x in zip(steps, norms, losses, strict=True):
    lines.append(
        f" [2025-03-01 10:{s % 60:02d}:00] iteration {s:8d}/  500000 | "
        f"consumed samples: {s * 256:12d} | elapsed time per iteration (ms):"
        f" 812.3 | learning rate: 1.500000E-04 | global batch size:   256 |"
        f" lm loss: {x:.6E} | loss scale: 1.0 | grad norm: {g:.4f} | "
        "number of skipped iterations:   0 | number of nan iterations:   0 |")
    if s % 100 == 0:
      lines.append(f" validation loss at iteration {s} | lm loss value: "
                   f"{x + 0.1:.6E} | lm loss PPL: 2.0E+01 |")
  path.write_text("\n".join(lines) + "\n")
  return steps, norms, losses, 3 + STEPS // 10


def _torchtitan(path):
  """torchtitan's console log, coloured: one line per step."""
  steps, norms, losses = _series(start=1)
  red, green, yellow, blue, reset = ("\x1b[31m", "\x1b[32m", "\x1b[33m",
                                     "\x1b[34m", "\x1b[39m")
  lines = ["[titan] 2025-03-01 10:00:00,001 - root - INFO - Starting job: "
           "Llama 3 debug training",
           "[titan] 2025-03-01 10:00:01,002 - root - INFO - Training starts "
           "at step 1."]
  for s, g, x in zip(steps, norms, losses, strict=True):
    lines.append(
        f"[titan] 2025-03-01 10:00:{s % 60:02d},123 - root - INFO - "
        f"{red}step: {s:2d}  {green}loss: {x:7.4f}  {yellow}grad_norm: "
        f"{g:7.4f}  {blue}memory: 21.23GiB(22.35%)  tps: 1,234  "
        f"tflops: 56.78  mfu: 5.74%{reset}")
  path.write_text("\n".join(lines) + "\n")
  return steps, norms, losses, 2


def _llmc(path):
  """llm.c's main.log: a training line per step, an evaluation line (tel)
  every 10."""
  steps, norms, losses = _series()
  lines = []
  for s, g, x in zip(steps, norms, losses, strict=True):
    if s % 10 == 0:
      lines.append(f"s:{s} tel:{x + 0.05:.4f}")
    lines.append(f"s:{s} trl:{x:.4f} lr:0.000600 norm:{g:.4f}")
  path.write_text("\n".join(lines) + "\n")
  return steps, norms, losses, STEPS // 10


@pytest.mark.parametrize("write, columns", [
    (_megatron, ("grad norm", "lm loss", "iteration")),
    (_torchtitan, ("grad_norm", "loss", "step")),
    (_llmc, ("norm", "trl", "s")),
], ids=["megatron", "torchtitan", "llm.c"])
def test_text_logs_replay_every_logged_step_once(tmp_path, capsys, write,
                                                 columns):
  path = tmp_path / "train.log"
  steps, norms, losses, other_lines = write(path)
  log = _logs.read_log(str(path))
  assert log.fmt == "text log"
  assert (log.norm_column, log.loss_column, log.step_column) == columns
  np.testing.assert_array_equal(log.steps, steps)
  np.testing.assert_allclose(log.norms, norms, rtol=1e-6)
  np.testing.assert_allclose(log.losses, losses, rtol=1e-6)
  assert log.left_out == other_lines  # evaluation lines and banners

  out = tmp_path / "out"
  assert _cli.main(["replay", str(path), "--methods", "skip:window=16",
                    "--out", str(out), "--no-plot"]) == 0
  text = " ".join(capsys.readouterr().out.split())
  assert (f"Left out {other_lines} lines without a step and a norm "
          "(evaluation lines, banners)") in text
  replayed = np.loadtxt(out / "replay.csv", delimiter=",", skiprows=1)
  np.testing.assert_array_equal(replayed[:, 0], steps)
  assert replayed[np.argmax(norms), -1] == 1  # the bad batch is skipped


def test_key_equals_value_lines(tmp_path):
  path = tmp_path / "train.log"
  path.write_text("step=1 loss=2.5 grad_norm=0.5\nsaving checkpoint\n"
                  "step=2 loss=2.4 grad_norm=nan\nstep=3 loss=2.3 "
                  "grad_norm=0.25\n")
  log = _logs.read_log(str(path))
  np.testing.assert_array_equal(log.steps, [1, 2, 3])
  np.testing.assert_array_equal(log.norms, [0.5, np.nan, 0.25])
  assert log.losses == [2.5, 2.4, 2.3] and log.left_out == 1
