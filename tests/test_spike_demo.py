"""examples/spike_demo.py end to end on a tiny model, and its resume."""

import json
import pathlib
import shutil
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import spike_demo  # noqa: E402
from metrics_reference import naive_mask, naive_runs  # noqa: E402

METHODS = ["none", "clip", "zclip", "adagc", "autoclip"]
STEPS = 30
TINY = ["--steps", str(STEPS), "--d-model", "32", "--n-layers", "1",
        "--n-heads", "2", "--seq-len", "16", "--batch-size", "4",
        "--ckpt-every", "10", "--clip-norm", "0.5", "--spike-window", "10",
        "--methods", ",".join(METHODS)]
ROW_KEYS = {"method", "step", "lr", "loss", "probe_loss", "grad_norm",
            "clipped_norm",
            "threshold", "clipped", "loss_spike"}


def _rows(out):
  with open(out / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  summary = spike_demo.main(TINY + ["--out", str(out)])
  return out, summary, _rows(out)


def test_writes_every_file_with_its_fields(demo, capsys):
  out, summary, rows = demo
  for png in ("loss.png", "grad_norm.png"):
    data = (out / png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  on_disk = json.loads((out / "summary.json").read_text())
  assert on_disk == json.loads(json.dumps(summary))
  assert [r["method"] for r in on_disk["runs"]] == METHODS
  assert on_disk["config"]["steps"] == STEPS
  for r in on_disk["runs"]:
    assert set(r) == {"method", "final_loss", "eval_loss", "spike_count",
                      "spike_score", "train_loss_spike_count",
                      "clipped_steps", "steps_per_second"}
    assert 0 < r["eval_loss"] < 6 and r["steps_per_second"] > 0
  assert len(rows) == STEPS * len(METHODS)
  for r in rows:
    assert ROW_KEYS <= set(r), r
  assert {r["method"] for r in rows if "detected" in r} == {"zclip"}
  assert {r["method"] for r in rows if "tensors_clipped" in r} == {"adagc"}


def test_metrics_agree_with_independent_computations(demo):
  out, summary, rows = demo
  by = {m: [r for r in rows if r["method"] == m] for m in METHODS}
  for m in METHODS:
    assert [r["step"] for r in by[m]] == list(range(STEPS))
    # Same init, same first batch: the first loss and gradient are equal,
    # whether the norm comes from the step (none, clip) or from the
    # transform's own state (zclip, adagc, autoclip).
    assert by[m][0]["loss"] == pytest.approx(by["none"][0]["loss"], rel=1e-6)
    assert by[m][0]["probe_loss"] == pytest.approx(by["none"][0]["probe_loss"],
                                                   rel=1e-6)
    assert by[m][0]["grad_norm"] == pytest.approx(by["none"][0]["grad_norm"],
                                                  rel=1e-5)
    for r in by[m]:
      assert r["clipped_norm"] <= r["grad_norm"] * (1 + 1e-6)
  for r in by["none"]:
    assert r["threshold"] is None and not r["clipped"]
  assert sum(r["clipped"] for r in by["clip"]) >= 1  # the 0.5 cap acted
  # Warm-up then cosine decay to 10% of the peak.
  lr = [r["lr"] for r in by["none"]]
  assert lr[0] == 0.0 and max(lr) == pytest.approx(1e-2)
  assert lr[-1] == pytest.approx(1e-3, rel=0.05)
  for entry in summary["runs"]:
    m = entry["method"]
    losses = np.array([r["loss"] for r in by[m]])
    probe = np.array([r["probe_loss"] for r in by[m]])
    # The probe batch is fixed: its loss differs from the training loss.
    assert not np.allclose(probe, losses)
    assert entry["final_loss"] == pytest.approx(losses[-min(50, STEPS):].mean())
    assert entry["clipped_steps"] == sum(r["clipped"] for r in by[m])
    flags = np.array([r["loss_spike"] for r in by[m]])
    # The demo's spike flags by the definition, as a plain loop would, on
    # the probe loss; the training-loss count by the same loop.
    np.testing.assert_array_equal(flags, naive_mask(probe, 10, 5.0))
    assert entry["train_loss_spike_count"] == naive_runs(
        naive_mask(losses, 10, 5.0))
    assert entry["spike_count"] == naive_runs(flags)
    assert entry["spike_score"] == pytest.approx(flags.mean())


def test_probe_loss_is_the_first_held_out_windows(demo):
  """Step 0's probe loss, by hand: the untrained model on the first
  ``probe_size`` held-out windows, cross-entropy in float64 NumPy."""
  import jax.numpy as jnp  # noqa: PLC0415

  from config import parse_args  # noqa: PLC0415
  from data import load_corpus  # noqa: PLC0415
  from train import make_model  # noqa: PLC0415

  _, _, rows = demo
  cfg, _ = parse_args(TINY)
  held = load_corpus().heldout
  t = cfg.seq_len
  windows = np.stack([held[i * t: i * t + t + 1]
                      for i in range(cfg.probe_size)]).astype(np.int32)
  logits = np.asarray(make_model(cfg)(jnp.asarray(windows[:, :-1])),
                      np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()
  first = next(r for r in rows if r["method"] == "none" and r["step"] == 0)
  assert first["probe_loss"] == pytest.approx(nll, rel=1e-5)


def test_resume_continues_identically(demo, tmp_path):
  out, summary, rows = demo
  copy = tmp_path / "resumed"
  shutil.copytree(out, copy)
  # Lose the last checkpoint of every method, as if the run died at step 20.
  for m in METHODS:
    shutil.rmtree(copy / m / "checkpoints" / str(STEPS))
  resumed = spike_demo.main(TINY + ["--out", str(copy), "--resume"])
  again = _rows(copy)
  assert len(again) == len(rows)
  for a, b in zip(rows, again):
    for k in ("loss", "probe_loss", "grad_norm", "clipped_norm", "threshold",
              "clipped"):
      assert a[k] == b[k], (a["method"], a["step"], k)
  for a, b in zip(summary["runs"], resumed["runs"]):
    assert a["eval_loss"] == b["eval_loss"]


@pytest.mark.parametrize("flag", ["--steps", "--probe-size"])
def test_cli_rejects_non_positive_counts(flag, capsys):
  from config import parse_args  # noqa: PLC0415

  with pytest.raises(SystemExit):
    parse_args([flag, "0"])
  assert f"{flag} must be >= 1" in capsys.readouterr().err
