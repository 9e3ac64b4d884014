"""The logs fine-tuning and training frameworks write, read for the replay:
the Hugging Face Trainer's console (TRL, ms-swift, LLaMA-Factory print the
same dicts), ms-swift's logging.jsonl, Megatron behind torchrun's rank
prefixes, Megatron-DeepSpeed, fairseq, PyTorch Lightning's metrics.csv, W&B
exports, torchtitan's TensorBoard; restarts, ranks and refusals.

Each sample is written here by hand in the shape the framework documents
(not copied from a run), with its numbers; the assertions repeat those
numbers, not what the reader computed.
"""

import json

import numpy as np
import pytest
from test_replay_formats import _write_run

from optax_zclip import _cli
from optax_zclip._replay import _logs


def _replay(tmp_path, capsys, path, *args):
  """Runs the command on ``path``; what it printed, on one line."""
  out = tmp_path / "out"
  assert _cli.main(["replay", str(path), "--methods", "clip@1", "--out",
                    str(out), "--no-plot", *args]) == 0
  return " ".join(capsys.readouterr().out.split())


def _columns(log):
  return log.norm_column, log.loss_column, log.step_column


# --------------------------------------------------------------------------
# The Hugging Face Trainer's console.

HF_CONSOLE = (
    "[INFO|trainer.py:2128] 2024-05-01 12:00:00,000 >> ***** Running "
    "training *****\n"
    "[INFO|trainer.py:2129] 2024-05-01 12:00:00,000 >>   Num examples = "
    "10,000\n"
    "  0%|          | 0/40 [00:00<?, ?it/s]\n"
    "/site-packages/torch/utils/checkpoint.py:91: UserWarning: None of the "
    "inputs have requires_grad=True. Gradients will be None\n"
    # A progress bar rewritten after "\r", the dict on the same line.
    "  25%|##5       | 10/40 [00:10<00:30,  1.00s/it]\r{'loss': '1.921', "
    "'grad_norm': '32.75', 'learning_rate': '1e-05', 'epoch': '0.01'}\n"
    "\r 25%|##5       | 10/40 [00:10<00:30,  1.00s/it]\r 50%|#####     | "
    "20/40 [00:20<00:20,  1.00s/it]{'loss': 1.85, 'grad_norm': nan, "
    "'learning_rate': 2e-05, 'epoch': 0.02}\n"
    "{'eval_loss': 1.8, 'eval_runtime': 10.0, 'eval_samples_per_second': "
    "100.0, 'epoch': 0.02}\n"
    "{'loss': '1.7', 'grad_norm': 'inf', 'learning_rate': '3e-05', "
    "'epoch': '0.03'}\n"
    "{'loss': 1.625, 'grad_norm': 0.875, 'learning_rate': 4e-05, "
    "'epoch': 0.04}\r\n"
    "{'train_runtime': 40.0, 'train_samples_per_second': 33.3, "
    "'train_loss': 1.75, 'epoch': 0.04}\n")


def test_hugging_face_console_dicts_are_numbered_and_say_so(tmp_path,
                                                            capsys):
  path = tmp_path / "train.log"
  path.write_text(HF_CONSOLE, newline="")
  log = _logs.read_log(str(path))
  assert log.fmt == "text log" and _columns(log) == ("grad_norm", "loss",
                                                     None)
  np.testing.assert_array_equal(log.steps, [0, 1, 2, 3])
  np.testing.assert_array_equal(log.norms, [32.75, np.nan, np.inf, 0.875])
  assert log.losses == [1.921, 1.85, 1.7, 1.625]
  assert log.numbered and log.left_out == 6 and log.relogged == 0
  text = _replay(tmp_path, capsys, path)
  assert ("Replayed 4 steps (0 to 3) of " in text and "norms from "
          "'grad_norm', losses from 'loss', no step column" in text)
  assert ("Left out 6 lines without a norm (progress bars, evaluation and "
          "summary lines, warnings)") in text
  assert ("Note: the lines give no step: the 4 norms are numbered 0 to 3 in "
          "the order of the file") in text


def test_printed_dicts_alone_and_numpy_reprs(tmp_path):
  # grep "grad_norm" of a console: the file starts with a dict, not JSON.
  path = tmp_path / "dicts.log"
  path.write_text("{'loss': np.float64(2.5), 'grad_norm': "
                  "np.float32(1.25), 'epoch': 0.5}\n"
                  "{'loss': 2.25, 'grad_norm': -inf}\n")
  with pytest.raises(_logs.LogError, match="the norm -inf is negative"):
    _logs.read_log(str(path))
  path.write_text("{'loss': np.float64(2.5), 'grad_norm': "
                  "np.float32(1.25), 'epoch': 0.5}\n"
                  "{'loss': 2.25, 'grad_norm': tensor(0.5, device='cuda:0')}"
                  "\n")
  log = _logs.read_log(str(path))
  np.testing.assert_array_equal(log.norms, [1.25, 0.5])
  assert log.losses == [2.5, 2.25] and log.step_column is None


def test_ms_swift_console_and_logging_jsonl(tmp_path, capsys):
  def row(step, g, loss):
    return {"loss": loss, "grad_norm": g, "learning_rate": 1e-05,
            "memory(GiB)": 20.1, "train_speed(iter/s)": 0.2,
            "epoch": step / 20, "global_step/max_steps": f"{step}/20",
            "percentage": f"{100 * step / 20:.2f}%", "elapsed_time": "10s",
            "remaining_time": "30s"}

  rows = [row(5, 0.5, 2.5), row(10, 4.25, 2.375),
          {"eval_loss": 2.4, "eval_runtime": 1.5, "epoch": 0.5,
           "global_step/max_steps": "10/20"},
          row(15, 0.625, 2.25), row(20, 0.75, 2.125),
          {"last_model_checkpoint": "/out/v0/checkpoint-20",
           "best_model_checkpoint": None, "best_metric": None,
           "global_step": 20, "log_history": [row(5, 0.5, 2.5)],
           "memory": {"cuda:0": "20.1GiB"}}]
  path = tmp_path / "logging.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  log = _logs.read_log(str(path))
  assert log.fmt == "JSON lines"
  assert _columns(log) == ("grad_norm", "loss", "global_step/max_steps")
  np.testing.assert_array_equal(log.steps, [5, 10, 15, 20])
  np.testing.assert_array_equal(log.norms, [0.5, 4.25, 0.625, 0.75])
  assert log.losses == [2.5, 2.375, 2.25, 2.125]
  assert log.summaries_left_out == 1 and log.left_out == 1
  text = _replay(tmp_path, capsys, path)
  assert "steps from 'global_step/max_steps'" in text
  assert "Note: left out 1 summary object (the run's last line" in text
  # Its console prints the same dicts, the step among them.
  console = tmp_path / "swift.log"
  console.write_text("[INFO:swift] Start time of running main: 2025-01-01\n"
                     + "".join(repr(r) + "\n" for r in rows[:4]))
  log = _logs.read_log(str(console))
  assert log.fmt == "text log" and not log.numbered
  np.testing.assert_array_equal(log.steps, [5, 10, 15])
  np.testing.assert_array_equal(log.norms, [0.5, 4.25, 0.625])


# --------------------------------------------------------------------------
# Megatron behind torchrun, Megatron-DeepSpeed, torchtitan's ranks.


def _megatron_line(step, loss, g):
  return (f" iteration {step:8d}/  292968 | consumed samples: "
          f"{step * 512:12d} | elapsed time per iteration (ms): 1200.5 | "
          f"learning rate: 1.000000E-04 | global batch size:   512 | lm loss:"
          f" {loss:.6E} | loss scale: 4096.0 | grad norm: {g} | number of "
          "skipped iterations:   0 | number of nan iterations:   0 |")


MEGATRON = [(10, 13.32803, 42.627), (20, 11.5, 12.5), (30, 10.25, 3.75)]


def _read_megatron(path):
  """The log at ``path``, checked to hold MEGATRON's iterations with
  Megatron's own columns."""
  log = _logs.read_log(str(path))
  assert _columns(log) == ("grad norm", "lm loss", "iteration")
  np.testing.assert_array_equal(log.steps, [10, 20, 30])
  np.testing.assert_array_equal(log.norms, [42.627, 12.5, 3.75])
  np.testing.assert_allclose(log.losses, [13.32803, 11.5, 10.25])
  return log


def test_megatron_behind_torchrun_reads_the_rank_that_logs(tmp_path, capsys):
  lines = [f"[default{r}]:using world size: 4, data-parallel size: 4"
           for r in range(4)]
  lines.append("[default0]:> building GPT model ...")
  for s, x, g in MEGATRON:
    lines.append(f"[default3]:{_megatron_line(s, x, g)}")
    lines.append(f"[default1]:[after training is done] datetime: {s}")
  path = tmp_path / "megatron.log"
  path.write_text("\n".join(lines) + "\n")
  log = _read_megatron(path)
  assert log.rank == 3 and log.left_out == 1  # rank 3's banner
  text = _replay(tmp_path, capsys, path)
  assert ("Note: the lines carry a launcher's rank prefix; the norms are rank"
          " 3's lines, the 7 lines of other ranks left out") in text


def test_megatron_deepspeed_reads_lm_loss_not_deepspeeds_loss(tmp_path):
  lines = ["using world size: 1, data-parallel size: 1"]
  for s, x, g in MEGATRON:
    lines += [f"[2024-01-01 00:00:{s:02d},000] [INFO] [logging.py:96:log_dist]"
              f" [Rank 0] step={s}, skipped=0, lr=[0.0001], "
              "mom=[(0.9, 0.95)]",
              f"steps: {s} loss: 99.5 iter time (s): 1.2 samples/sec: 30.1",
              _megatron_line(s, x, g)]
  path = tmp_path / "train.log"
  path.write_text("\n".join(lines) + "\n")
  _read_megatron(path)


def test_torchtitan_ranks_logging_the_same_steps_keep_the_lowest(tmp_path,
                                                                 capsys):
  lines = []
  for s, g in ((1, 3.25), (2, 2.5), (3, 1.75)):
    for rank in (1, 0):  # rank 1's lines first: the lowest is still read
      lines.append(f"[rank{rank}]:[titan] 2025-01-01 12:00:0{s},000 - root "
                   f"- INFO - step: {s:2d}  loss: {12.0 - s:7.4f}  "
                   f"grad_norm: {g + rank:7.4f}  memory: 21.23GiB(22.35%)")
  path = tmp_path / "titan.log"
  path.write_text("\n".join(lines) + "\n")
  log = _logs.read_log(str(path))
  assert _columns(log) == ("grad_norm", "loss", "step")
  np.testing.assert_array_equal(log.steps, [1, 2, 3])
  np.testing.assert_array_equal(log.norms, [3.25, 2.5, 1.75])
  assert log.losses == [11.0, 10.0, 9.0]
  assert log.rank == 0 and log.relogged == 0
  text = _replay(tmp_path, capsys, path)
  assert ("2 ranks logged norms (0, 1): rank 0's lines are read, the 3 lines "
          "of other ranks left out") in text


# --------------------------------------------------------------------------
# fairseq.


FAIRSEQ = [(100, 9.849, 1.875), (200, 9.25, 12.5), (300, 8.75, 1.5)]


def _read_fairseq(path):
  """The log at ``path``, checked to hold FAIRSEQ's updates (the train and
  valid summaries left out)."""
  log = _logs.read_log(str(path))
  assert _columns(log) == ("gnorm", "loss", "num_updates")
  np.testing.assert_array_equal(log.steps, [100, 200, 300])
  np.testing.assert_array_equal(log.norms, [1.875, 12.5, 1.5])
  assert log.losses == [9.849, 9.25, 8.75]
  return log


def test_fairseq_simple_format_and_its_epoch_summaries(tmp_path, capsys):
  lines = ["2021-03-01 12:00:00 | INFO | fairseq_cli.train | task: "
           "TranslationTask"]
  for n, x, g in FAIRSEQ:
    lines.append(
        f"2021-03-01 12:0{n // 100}:00 | INFO | train_inner | epoch 001:  "
        f"{n:5d} / 300 loss={x}, nll_loss=9.8, ppl=922, wps=1.2e4, ups=1.1, "
        f"wpb=8192, bsz=16, num_updates={n}, lr=1e-05, gnorm={g}, "
        "train_wall=30, gb_free=10, wall=60")
  lines += [
      "2021-03-01 12:04:00 | INFO | valid | epoch 001 | valid on 'valid' "
      "subset | loss 8.5 | nll_loss 8.4 | ppl 362 | wps 3e+04 | wpb 2000 | "
      "bsz 30 | num_updates 300 | best_loss 8.5",
      "2021-03-01 12:04:01 | INFO | train | epoch 001 | loss 9.1 | nll_loss "
      "9 | ppl 512 | wps 1.2e+04 | ups 1.1 | wpb 8192 | bsz 16 | num_updates "
      "300 | lr 1e-05 | gnorm 5.25 | train_wall 90 | gb_free 10 | wall 240"]
  path = tmp_path / "train.log"
  path.write_text("\n".join(lines) + "\n")
  log = _read_fairseq(path)
  assert log.summaries_left_out == 1 and log.relogged == 0
  assert log.left_out == 2  # the banner, the valid line
  text = _replay(tmp_path, capsys, path)
  assert "Note: left out 1 epoch summary line (fairseq's train lines" in text


def test_fairseq_json_format(tmp_path):
  lines = ["2021-03-01 12:00:00 | INFO | fairseq_cli.train | model "
           "transformer, criterion LabelSmoothedCrossEntropyCriterion"]
  for n, x, g in FAIRSEQ:
    stats = {"epoch": 1, "update": n / 300, "loss": str(x),
             "nll_loss": "9.8", "ppl": "922", "wps": "12000", "ups": "1.1",
             "wpb": "8192", "bsz": "16", "num_updates": str(n),
             "lr": "1e-05", "gnorm": str(g), "train_wall": "30",
             "gb_free": "10", "wall": "60"}
    lines.append(f"2021-03-01 12:0{n // 100}:00 | INFO | train_inner | "
                 + json.dumps(stats))
  lines += ['2021-03-01 12:04:00 | INFO | valid | {"epoch": 1, "valid_loss":'
            ' "8.5", "valid_num_updates": "300"}',
            '2021-03-01 12:04:01 | INFO | train | {"epoch": 1, "train_loss": '
            '"9.1", "train_gnorm": "5.25", "train_num_updates": "300"}']
  path = tmp_path / "train.log"
  path.write_text("\n".join(lines) + "\n")
  log = _read_fairseq(path)
  assert log.left_out == 2 and log.summaries_left_out == 1
  # Without the logging prefix (older fairseq printed the JSON alone).
  path.write_text("\n".join(line.rpartition(" | ")[2]
                            for line in lines[1:]) + "\n")
  log = _logs.read_log(str(path))
  assert log.fmt == "JSON lines"
  np.testing.assert_array_equal(log.steps, [100, 200, 300])
  np.testing.assert_array_equal(log.norms, [1.875, 12.5, 1.5])


# --------------------------------------------------------------------------
# Lightning and W&B tables.


def test_lightning_metrics_csv_reads_the_total_norm(tmp_path):
  path = tmp_path / "metrics.csv"
  path.write_text(
      "epoch,grad_2.0_norm/layer.weight,grad_2.0_norm/layer.bias,"
      "grad_2.0_norm_total,step,train_loss_epoch,train_loss_step,val_loss\n"
      "0,0.75,0.25,0.875,49,,2.5,\n"
      "0,3.5,0.5,6.25,99,,2.375,\n"
      "0,,,,99,,,2.25\n"  # the epoch's end: validation
      "0,,,,99,2.4,,\n"
      "1,0.5,0.125,0.625,149,,2.125,\n")
  log = _logs.read_log(str(path))
  assert _columns(log) == ("grad_2.0_norm_total", "train_loss_step", "step")
  np.testing.assert_array_equal(log.steps, [49, 99, 149])
  np.testing.assert_array_equal(log.norms, [0.875, 6.25, 0.625])
  assert log.losses == [2.5, 2.375, 2.125]
  assert log.left_out == 2 and log.relogged == 0 and log.notes == [
      "a norm every 50 steps: a subsampled series. It is replayed as the 3 "
      "steps it has, one after another, so a method's warm-up and windows "
      "span 50 times as many training steps as in a run, and the steps "
      "between are not seen"]


def test_wandb_exports(tmp_path, capsys):
  runs = tmp_path / "runs.csv"  # the run page's export, min and max columns
  runs.write_text(
      '"_step","train/grad_norm","train/grad_norm__MIN",'
      '"train/grad_norm__MAX","train/loss","eval/loss"\n'
      "0,1.5,1.25,1.75,2.5,\n1,,,,,2.75\n2,3.25,3,3.5,2.25,\n")
  log = _logs.read_log(str(runs))
  assert _columns(log) == ("train/grad_norm", "train/loss", "_step")
  np.testing.assert_array_equal(log.steps, [0, 2])
  np.testing.assert_array_equal(log.norms, [1.5, 3.25])
  assert log.losses == [2.5, 2.25] and log.left_out == 1
  chart = tmp_path / "chart.csv"  # a chart's export: "<run> - <metric>"
  chart.write_text(
      '"Step","swift-sun-42 - train/grad_norm","swift-sun-42 - '
      'train/grad_norm__MIN","swift-sun-42 - train/grad_norm__MAX",'
      '"swift-sun-42 - train/loss"\n'
      "10,0.5,0.25,0.75,3.5\n20,8.5,8,9,3.25\n")
  log = _logs.read_log(str(chart))
  assert _columns(log) == ("train/grad_norm", "train/loss", "Step")
  np.testing.assert_array_equal(log.steps, [10, 20])
  np.testing.assert_array_equal(log.norms, [0.5, 8.5])
  assert log.losses == [3.5, 3.25]
  text = _replay(tmp_path, capsys, chart)
  assert ("a W&B chart export) with one run, 'swift-sun-42': read by their "
          "metric") in text
  chart.write_text('"Step","run-a - train/grad_norm","run-b - '
                   'train/grad_norm"\n10,0.5,0.75\n')
  with pytest.raises(_logs.LogError, match=r"2 columns could be the gradient "
                     r"norm \(run-a - train/grad_norm, run-b - "
                     r"train/grad_norm\)"):
    _logs.read_log(str(chart))


# --------------------------------------------------------------------------
# Restarts: one rule for every reader.

# A run logged steps 1-8, crashed, resumed from its checkpoint at step 5 and
# logged steps 6-10 again with the resumed run's values.
FIRST = {s: 0.5 + s / 8 for s in range(1, 9)}
RESUMED = {s: 2.0 + s / 4 for s in range(6, 11)}
WANT_STEPS = list(range(1, 11))
WANT_NORMS = [FIRST[s] for s in range(1, 6)] + [RESUMED[s]
                                                for s in range(6, 11)]


def test_a_restarted_text_log_and_tensorboard_run_give_one_series(tmp_path,
                                                                   capsys):
  path = tmp_path / "titan.log"
  path.write_text("".join(
      f"[titan] 2025-01-01 12:00:00,000 - root - INFO - step: {s:2d}  loss: "
      f"{10 - s / 2}  grad_norm: {g}\n"
      for part in (FIRST, RESUMED) for s, g in part.items()))
  run = tmp_path / "tb"
  _write_run(run / "a", [(s, {"grad_norm": g}) for s, g in FIRST.items()])
  _write_run(run / "b", [(s, {"grad_norm": g}) for s, g in RESUMED.items()],
             wall_start=1000.0)
  for log in (_logs.read_log(str(path)), _logs.read_log(str(run))):
    np.testing.assert_array_equal(log.steps, WANT_STEPS)
    np.testing.assert_array_equal(log.norms, WANT_NORMS)
    assert log.relogged == 3  # steps 6, 7 and 8
  for where in (path, run):
    text = _replay(tmp_path, capsys, where)
    assert ("Note: 3 steps were logged again (a restart from a checkpoint): "
            "the last write of each is replayed") in text
    assert "Replayed 10 steps (1 to 10)" in text


def test_steps_logged_again_from_the_first_say_where(tmp_path):
  path = tmp_path / "two_runs.csv"
  path.write_text("step,grad_norm\n0,1.5\n1,2.5\n0,0.5\n1,0.75\n")
  log = _logs.read_log(str(path))
  np.testing.assert_array_equal(log.norms, [0.5, 0.75])
  assert log.relogged == 2 and log.notes == [
      "2 steps were logged again (a restart from a checkpoint, or a second "
      "run in this log: --where COLUMN=VALUE keeps one): the last write of "
      "each is replayed"]


# --------------------------------------------------------------------------
# The loss column, and logs without a norm.


def test_torchtitan_tensorboard_reads_the_global_mean_loss(tmp_path):
  _write_run(tmp_path, [
      (s, {"loss_metrics/global_max_loss": 20.0 - s,
           "loss_metrics/global_avg_loss": 12.0 - s, "grad_norm": g,
           "memory/max_active(GiB)": 21.5})
      for s, g in ((1, 3.25), (2, 2.5))])
  log = _logs.read_log(str(tmp_path))
  assert _columns(log) == ("grad_norm", "loss_metrics/global_avg_loss",
                           "step")
  assert log.losses == [11.0, 10.0]


def test_the_report_says_when_no_loss_column_was_found(tmp_path, capsys):
  path = tmp_path / "norms.csv"
  path.write_text("step,grad_norm,lr\n0,0.5,1e-4\n1,0.75,1e-4\n")
  text = _replay(tmp_path, capsys, path)
  assert ("norms from 'grad_norm', no loss column found (skip's loss test is"
          " off), steps from 'step'") in text


@pytest.mark.parametrize("text, columns", [
    ("s:0 tel:10.968871\ns:250 tel:6.5\n", "s, tel"),  # llm.c, eval only
    ("{'loss': 1.921, 'learning_rate': 1e-05, 'epoch': 0.01}\n"
     "{'train_runtime': 30.0, 'train_loss': 1.9, 'epoch': 0.02}\n",
     "loss, learning_rate, epoch, train_runtime, train_loss"),
])
def test_a_log_without_a_norm_is_refused_with_its_columns(tmp_path, capsys,
                                                          text, columns):
  path = tmp_path / "train.log"
  path.write_text(text)
  assert _cli.main(["replay", str(path), "--out", str(tmp_path / "o")]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert line.endswith("no column looks like the gradient norm; give it with "
                       f"--norm-column (its columns: {columns})")
