"""Reading logs for the replay: CSV/TSV, JSON lines, `trainer_state.json`,
one number per line, and which columns are read."""

import json

import numpy as np
from test_replay import LOSSES, G, N, _write_wandb_csv

from optax_zclip._replay import _logs


def test_csv_gaps_and_no_step_column(tmp_path):
  log = tmp_path / "run.csv"
  log.write_text("step,grad_norm,loss\n0,1.0,3\n1,2.0,\n5,nan,2.9\n"
                 "6,,2.8\n9,inf,2.7\n")
  got = _logs.read_log(str(log))
  np.testing.assert_array_equal(got.steps, [0, 1, 5, 9])
  np.testing.assert_array_equal(got.norms, [1.0, 2.0, np.nan, np.inf])
  assert got.losses == [3.0, None, 2.9, 2.7] and got.left_out == 1
  assert (got.norm_column, got.loss_column, got.step_column) == (
      "grad_norm", "loss", "step")
  assert got.notes == ["the steps have gaps (4 norms over steps 0 to 9, 6 "
                       "steps without one): they are replayed as the 4 steps "
                       "the log has, one after another"]
  _write_wandb_csv(log, with_steps=False)
  got = _logs.read_log(str(log))
  assert got.step_column is None and got.notes == []
  np.testing.assert_array_equal(got.steps, np.arange(N))
  np.testing.assert_array_equal(got.norms, G)
  assert got.losses == LOSSES
  tsv = tmp_path / "run.tsv"  # TensorBoard's export, tab-separated here
  tsv.write_text("Wall time\tStep\tValue\n1.5\t10\t0.5\n1.6\t20\t0.25\n")
  got = _logs.read_log(str(tsv))
  assert (got.norm_column, got.step_column) == ("Value", "Step")
  np.testing.assert_array_equal(got.norms, [0.5, 0.25])
  assert "a norm every 10 steps: a subsampled series" in got.notes[0]


def test_json_lines_trainer_state_and_plain(tmp_path):
  jsonl = tmp_path / "metrics.jsonl"
  rows = [{"method": m, "seed": 0, "step": t, "grad_norm": 1.0 + t + i,
           "loss": 2.0, "threshold": None}
          for i, m in enumerate(("zclip", "none")) for t in range(3)]
  rows[1]["grad_norm"] = None  # not logged at that step
  jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  got = _logs.read_log(str(jsonl), where=["method=zclip", "seed=0"])
  assert got.fmt == "JSON lines" and got.left_out == 1
  np.testing.assert_array_equal(got.steps, [0, 2])
  np.testing.assert_array_equal(got.norms, [1.0, 3.0])
  state = tmp_path / "trainer_state.json"
  history = [{"epoch": 0.1, "grad_norm": 4.5, "learning_rate": 1e-4,
              "loss": 2.5, "step": 10},
             {"epoch": 0.1, "eval_loss": 2.6, "step": 10},
             {"epoch": 0.2, "grad_norm": float("nan"), "loss": 2.4,
              "step": 20},
             {"train_loss": 2.45, "train_runtime": 1.0, "step": 20}]
  state.write_text(json.dumps({"global_step": 20, "log_history": history},
                              indent=2))
  got = _logs.read_log(str(state))
  assert got.fmt == "Hugging Face trainer_state.json" and got.left_out == 2
  np.testing.assert_array_equal(got.steps, [10, 20])
  np.testing.assert_array_equal(got.norms, [4.5, np.nan])
  assert got.losses == [2.5, 2.4]
  plain = tmp_path / "norms.txt"
  plain.write_text("# grad norms\n0.5\n\n0.75\nNaN\n")
  got = _logs.read_log(str(plain))
  np.testing.assert_array_equal(got.norms, [0.5, 0.75, np.nan])
  assert got.losses is None and got.step_column is None
