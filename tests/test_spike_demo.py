"""The spike demo end to end on a tiny model, and its resume.

The demo is the folder ``examples/spike_demo/``; it is imported through its
command, ``examples/spike_demo.py``, which puts that folder on ``sys.path``
(so ``config``, ``data`` and ``train`` below are the demo's modules).
"""

import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES / "spike_demo"))
sys.path.insert(0, str(EXAMPLES))

import spike_demo  # noqa: E402
from references import ZClipRef, tree_norm64  # noqa: E402
from metrics_reference import naive_mask, naive_runs  # noqa: E402

from config import parse_args  # noqa: E402
from data import load_corpus  # noqa: E402
from model import next_token_loss  # noqa: E402
from train import host_rows, make_model  # noqa: E402

METHODS = ["none", "clip", "zclip", "adagc", "autoclip"]
STEPS = 30
TINY = ["--steps", str(STEPS), "--d-model", "32", "--n-layers", "1",
        "--n-heads", "2", "--seq-len", "16", "--batch-size", "4",
        "--ckpt-every", "10", "--clip-norm", "0.5", "--spike-window", "10",
        # Low enough for ZClip to flag spikes in the few steps after its
        # 25-step warm-up.
        "--zclip-z-thresh", "1.0",
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
    # every norm read from the clipping transform's own state.
    assert by[m][0]["loss"] == pytest.approx(by["none"][0]["loss"], rel=1e-6)
    assert by[m][0]["probe_loss"] == pytest.approx(by["none"][0]["probe_loss"],
                                                   rel=1e-6)
    assert by[m][0]["grad_norm"] == pytest.approx(by["none"][0]["grad_norm"],
                                                  rel=1e-5)
    for r in by[m]:
      assert r["clipped_norm"] <= r["grad_norm"] * (1 + 1e-6)
  for r in by["none"]:
    assert r["threshold"] is None and not r["clipped"]
    assert r["clipped_norm"] == r["grad_norm"]
  # Fixed clipping, and AdaGC in its warm-up (100 steps, more than the run),
  # cap the global norm at --clip-norm 0.5.
  n_tensors = len(jax.tree.leaves(nnx.state(
      make_model(parse_args(TINY)[0]), nnx.Param)))
  for m in ("clip", "adagc"):
    for r in by[m]:
      assert r["clipped_norm"] == pytest.approx(min(r["grad_norm"], 0.5),
                                                rel=1e-5)
      if abs(r["grad_norm"] - 0.5) > 1e-5:  # clear of rounding at the cap
        assert r["clipped"] == (r["grad_norm"] > 0.5)
  assert all(r["threshold"] == 0.5 for r in by["clip"])
  assert sum(r["clipped"] for r in by["clip"]) >= 1  # the 0.5 cap acted
  for r in by["adagc"]:  # the warm-up scales every tensor or none
    assert r["threshold"] is None
    assert r["tensors_clipped"] == (n_tensors if r["clipped"] else 0)
  # ZClip's decisions, by the authors' procedure in float64 on the logged
  # norms: a step is "detected" exactly when the reference calls it a spike.
  ref = ZClipRef(alpha=0.97, z_thresh=1.0, warmup_steps=25,
                 max_grad_norm=None)
  for r in by["zclip"]:
    decision = ref.step(r["grad_norm"])
    assert r["detected"] == decision["spike"], r["step"]
    assert r["clipped_norm"] == pytest.approx(
        decision["scale"] * r["grad_norm"], rel=1e-4)
  assert ref.spikes >= 1  # the comparison saw spikes, not only their absence
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


def test_first_grad_norm_is_the_gradients_norm(demo):
  """Step 0's logged norm, of every method, is the float64 norm of the
  gradient of the untrained model on the first training batch."""
  _, _, rows = demo
  cfg, _ = parse_args(TINY)
  batch = load_corpus().batch(cfg.seed, 0, cfg.batch_size, cfg.seq_len)
  grads = nnx.grad(next_token_loss)(make_model(cfg), jnp.asarray(batch))
  norm = tree_norm64(jax.tree.leaves(grads))
  for r in rows:
    if r["step"] == 0:
      assert r["grad_norm"] == pytest.approx(norm, rel=1e-5), r["method"]


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
  for a, b in zip(rows, again, strict=True):
    assert a == b, (a["method"], a["step"])
  for a, b in zip(summary["runs"], resumed["runs"], strict=True):
    assert a["eval_loss"] == b["eval_loss"]


def test_rows_follow_the_telemetry_keys():
  """Host rows from synthetic step outputs: a spike is a step whose spike
  count exceeds the previous step's, across calls (chunks between
  checkpoints); threshold and tensor counts only where the telemetry has
  them; an infinite threshold (no clipping) is logged as None."""
  f32, i32 = np.float32, np.int32

  def step(stats):
    return {"loss": f32(2.5), "probe_loss": f32(2.25), "stats": stats}

  def zclip(count, clipped_norm):
    return step({"grad_norm": f32(4.0), "clipped_norm": f32(clipped_norm),
                 "threshold": f32(3.0), "spike_count": i32(count)})

  lr = lambda t: 0.5 * t  # noqa: E731
  out = [zclip(2, 4.0), zclip(3, 3.0), zclip(3, 4.0), zclip(5, 3.0)]
  first, last = host_rows(out[:2], 7, lr, {"spike_count": i32(2)})
  second, _ = host_rows(out[2:], 9, lr, last)
  rows = first + second
  assert [r["step"] for r in rows] == [7, 8, 9, 10]
  assert [r["lr"] for r in rows] == [3.5, 4.0, 4.5, 5.0]
  assert [r["detected"] for r in rows] == [False, True, False, True]
  assert [r["clipped"] for r in rows] == [False, True, False, True]
  assert rows[0] == {"step": 7, "lr": 3.5, "loss": 2.5, "probe_loss": 2.25,
                     "grad_norm": 4.0, "clipped_norm": 4.0, "threshold": 3.0,
                     "detected": False, "clipped": False}
  adagc = step({"grad_norm": f32(4.0), "clipped_norm": f32(3.0),
                "num_clipped": i32(6)})
  (row,), _ = host_rows([adagc], 0, lr, {})
  assert row["threshold"] is None and row["tensors_clipped"] == 6
  assert "detected" not in row and row["clipped"]
  none = step({"grad_norm": f32(4.0), "clipped_norm": f32(4.0),
               "threshold": f32(np.inf)})
  (row,), _ = host_rows([none], 0, lr, {})
  assert row["threshold"] is None and not row["clipped"]
  assert set(row) == {"step", "lr", "loss", "probe_loss", "grad_norm",
                      "clipped_norm", "threshold", "clipped"}


@pytest.mark.parametrize("flag", ["--steps", "--probe-size"])
def test_cli_rejects_non_positive_counts(flag, capsys):
  with pytest.raises(SystemExit):
    parse_args([flag, "0"])
  assert f"{flag} must be >= 1" in capsys.readouterr().err
