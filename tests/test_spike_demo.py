"""The spike demo end to end on a tiny model: its figures, resume and CLI.

The demo is the folder ``examples/spike_demo/``; it is imported through its
command, ``examples/spike_demo.py``, which puts that folder on ``sys.path``
(so ``config``, ``data`` and ``train`` below are the demo's modules). One
small run (two seeds, bad batches at two steps, two fixed thresholds) feeds
most tests, which recompute its figures from metrics.jsonl by plain loops.
"""

import json
import math
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import optax_zclip

pytestmark = pytest.mark.examples

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES / "spike_demo"))
sys.path.insert(0, str(EXAMPLES))

import spike_demo  # noqa: E402
from metrics_reference import naive_mask, naive_runs  # noqa: E402
from references import SkipSpikesRef, ZClipRef, tree_norm64  # noqa: E402

from config import parse_args  # noqa: E402
from data import load_corpus, outlier_batch  # noqa: E402
from model import next_token_loss  # noqa: E402
from train import (  # noqa: E402
  host_rows,
  make_model,
  make_tx,
  restore,
  stats_kind,
)

STEPS, INJECT, HORIZON, SEEDS = 40, (28, 34), 5, (0, 1)
T0 = INJECT[0]  # the first injected step, where the branches part
RUNS = ["none", "clip@0.5", "clip@4", "zclip", "zclip+skip"]
TINY = ["--steps", str(STEPS), "--seeds", "2", "--d-model", "32",
        "--n-layers", "1", "--n-heads", "2", "--seq-len", "16",
        "--batch-size", "4", "--ckpt-every", "20", "--clip-norm", "0.5",
        "--clip-norms", "0.5,4", "--inject", "28,34", "--horizon",
        str(HORIZON), "--inject-kind", "repeat", "--spike-window", "10",
        # Low enough for ZClip to flag spikes in the few steps after its
        # 25-step warm-up; a short skip window so that skip_spikes tests
        # steps in so short a run.
        "--zclip-z-thresh", "1.0", "--skip-window", "20",
        "--methods", "none,clip,zclip,zclip+skip"]
ROW_KEYS = {"method", "seed", "branch", "step", "lr", "loss", "probe_loss",
            "grad_norm", "clipped_norm", "threshold", "clipped", "injected",
            "loss_spike"}


def _rows(out):
  with open(out / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _series(rows, run, seed, branch, key="probe_loss"):
  return [r[key] for r in rows if r["method"] == run and r["seed"] == seed
          and r["branch"] == branch]


@pytest.fixture(scope="module")
def demo(spike_demo_run):
  # One run of TINY per session (conftest.py), shared with test_replay.py.
  return spike_demo_run


def test_writes_every_file_with_its_fields(demo):
  out, summary, rows = demo
  for png in ("damage.png", "injection_loss.png", "grad_norm.png",
              "loss.png"):
    data = (out / png).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  on_disk = json.loads((out / "summary.json").read_text())
  assert on_disk == json.loads(json.dumps(summary))
  assert [r["method"] for r in on_disk["runs"]] == RUNS
  cfg = on_disk["config"]
  assert cfg["steps"] == STEPS and cfg["inject"] == list(INJECT)
  assert cfg["runs"] == RUNS and cfg["seeds_run"] == list(SEEDS)
  assert "damage" in cfg["definitions"]
  for r in on_disk["runs"]:
    for k in ("damage", "damage_std", "recovery", "recovery_std",
              "final_loss", "eval_loss", "clean_damage", "clean_recovery",
              "inject_norm_ratio"):
      assert math.isfinite(r[k]), (r["method"], k)
    assert [s["seed"] for s in r["per_seed"]] == list(SEEDS)
    assert 0 < r["eval_loss"] < 6 and r["steps_per_second"] > 0
  assert len(rows) == len(RUNS) * len(SEEDS) * 2 * STEPS
  for r in rows:
    assert ROW_KEYS <= set(r), r
    assert r["injected"] == (r["branch"] == "injected"
                             and r["step"] in INJECT)
  assert {r["method"] for r in rows if "detected" in r} == {"zclip",
                                                          "zclip+skip"}
  assert not any("tensors_clipped" in r for r in rows)  # AdaGC only
  assert {r["method"] for r in rows if "skipped" in r} == {"zclip+skip"}


def _damage_recovery(probe, inject, horizon):
  """The README's definition, as a plain loop."""
  damage, recovery = [], []
  for i, t in enumerate(inject):
    h = horizon
    if i + 1 < len(inject):
      h = min(h, inject[i + 1] - t)
    h = min(h, len(probe) - 1 - t)
    worst, back = -math.inf, None
    for k in range(1, h + 1):
      rise = probe[t + k] - probe[t]
      worst = max(worst, rise)
      if back is None and rise <= 0:
        back = k
    damage.append(worst)
    recovery.append(h if back is None else back)
  return sum(damage) / len(damage), sum(recovery) / len(recovery)


def test_damage_and_recovery_recomputed_from_the_metrics(demo):
  _, summary, rows = demo
  for entry in summary["runs"]:
    m = entry["method"]
    for fig in entry["per_seed"]:
      s = fig["seed"]
      inj = _series(rows, m, s, "injected")
      clean = _series(rows, m, s, "clean")
      d, r = _damage_recovery(inj, INJECT, HORIZON)
      cd, cr = _damage_recovery(clean, INJECT, HORIZON)
      assert fig["damage"] == pytest.approx(d, abs=1e-12)
      assert fig["recovery"] == pytest.approx(r)
      assert fig["clean_damage"] == pytest.approx(cd, abs=1e-12)
      assert fig["clean_recovery"] == pytest.approx(cr)
      assert fig["excess_damage"] == pytest.approx(d - cd, abs=1e-12)
      # The injected step's norm over the clean run's median after both
      # warm-ups (ZClip's 25 steps are the longer one here).
      norms = _series(rows, m, s, "injected", "grad_norm")
      median = float(np.median(_series(rows, m, s, "clean",
                                        "grad_norm")[25:]))
      assert fig["inject_norm_ratio"] == pytest.approx(
          (norms[28] + norms[34]) / 2 / median, rel=1e-9)
      # The two continuations share the prefix and part at the injection,
      # unless skip_spikes dropped the injected step.
      assert inj[:T0 + 1] == clean[:T0 + 1]
      skipped = _series(rows, m, s, "injected", "skipped") if m == (
          "zclip+skip") else [False] * STEPS
      if skipped[T0]:  # the parameters stayed as they were
        assert inj[T0 + 1] == inj[T0]
      else:
        assert inj[T0 + 1] != clean[T0 + 1]
    # Mean and sample standard deviation across seeds, with NumPy.
    for k in ("damage", "recovery", "clean_damage", "final_loss",
              "eval_loss", "clean_final_loss", "clipped_steps"):
      vals = np.array([f[k] for f in entry["per_seed"]], float)
      assert entry[k] == pytest.approx(vals.mean(), abs=1e-12)
      assert entry[k + "_std"] == pytest.approx(vals.std(ddof=1), abs=1e-12)
  # One pair, by hand: zclip against none, seed by seed.
  by = {e["method"]: e for e in summary["runs"]}
  (p,) = [p for p in summary["paired"] if (p["a"], p["b"], p["figure"]) ==
          ("none", "zclip", "damage")]
  diffs = [a["damage"] - b["damage"] for a, b in
           zip(by["none"]["per_seed"], by["zclip"]["per_seed"], strict=True)]
  assert p["per_seed"] == pytest.approx(diffs)
  assert p["a_lower_on"] == sum(d < 0 for d in diffs)
  sd = np.std(diffs, ddof=1)
  assert p["separated"] == bool(
      (all(d > 0 for d in diffs) or all(d < 0 for d in diffs))
      and abs(np.mean(diffs)) > 2 * sd / np.sqrt(2))


def test_injected_batches_are_outliers_shared_by_every_run(demo):
  out, _, rows = demo
  corpus = load_corpus()
  rep = outlier_batch("repeat", T0, 4, 16, corpus)
  assert rep.shape == (4, 17) and rep.dtype == np.int32
  assert len(np.unique(rep)) == 1  # one byte, the whole batch
  assert rep[0, 0] in set(corpus.train.tolist())
  np.testing.assert_array_equal(rep, outlier_batch("repeat", T0, 4, 16,
                                                   corpus))
  assert not np.array_equal(rep, outlier_batch("repeat", 34, 4, 16, corpus))
  rnd = outlier_batch("random", 30, 64, 16, corpus)
  assert rnd.min() >= 0 and rnd.max() <= 255 and len(np.unique(rnd)) > 200
  # The logged loss of the first injected step is the loss of the repeat
  # batch under the parameters saved at the branch point, for every run and
  # seed; the clean branch's is that of the seed's own batch.
  cfg, _ = parse_args(TINY)
  for run in ("none", "zclip"):
    for seed in SEEDS:
      model = make_model(cfg, seed)
      opt = nnx.Optimizer(model, make_tx(run, cfg), wrt=nnx.Param)
      mngr = ocp.CheckpointManager(
          (out / run / f"seed{seed}" / "branch" / "checkpoints").absolute())
      restore(mngr, T0, model, opt)
      mngr.close()
      inj = _series(rows, run, seed, "injected", "loss")[T0]
      clean = _series(rows, run, seed, "clean", "loss")[T0]
      want = float(next_token_loss(model, jnp.asarray(rep)))
      assert inj == pytest.approx(want, rel=1e-5)
      batch = corpus.batch(seed, T0, 4, 16)
      assert clean == pytest.approx(
          float(next_token_loss(model, jnp.asarray(batch))), rel=1e-5)
      assert inj != pytest.approx(clean, rel=1e-3)


def test_metrics_agree_with_independent_computations(demo):
  _, summary, rows = demo
  for entry in summary["runs"]:
    m = entry["method"]
    for s in SEEDS:
      for branch in ("clean", "injected"):
        mine = [r for r in rows if r["method"] == m and r["seed"] == s
                and r["branch"] == branch]
        assert [r["step"] for r in mine] == list(range(STEPS))
        for r in mine:
          assert r["clipped_norm"] <= r["grad_norm"] * (1 + 1e-6)
        if m.startswith("clip@"):
          c = float(m[5:])
          assert all(r["threshold"] == c for r in mine)
          for r in mine:
            assert r["clipped_norm"] == pytest.approx(min(r["grad_norm"], c),
                                                      rel=1e-5)
        if m == "none":
          assert all(r["threshold"] is None and not r["clipped"]
                     for r in mine)
        if m == "zclip":
          # ZClip's decisions, by the authors' procedure in float64 on the
          # logged norms.
          ref = ZClipRef(alpha=0.97, z_thresh=1.0, warmup_steps=25,
                         max_grad_norm=None)
          for r in mine:
            decision = ref.step(r["grad_norm"])
            assert r["detected"] == decision["spike"], r["step"]
            assert r["clipped_norm"] == pytest.approx(
                decision["scale"] * r["grad_norm"], rel=1e-4)
        if m == "zclip+skip":
          ref = SkipSpikesRef(window=20, sigma=6.0)
          for r in mine:
            assert r["skipped"] == ref.step(r["grad_norm"], r["loss"])["skip"]
            if r["skipped"]:
              assert r["clipped_norm"] == 0.0 and r["clipped"]
      inj = [r for r in rows if r["method"] == m and r["seed"] == s
             and r["branch"] == "injected"]
      fig = next(f for f in entry["per_seed"] if f["seed"] == s)
      losses = np.array([r["loss"] for r in inj])
      probe = np.array([r["probe_loss"] for r in inj])
      assert fig["final_loss"] == pytest.approx(losses[-50:].mean())
      assert fig["clipped_steps"] == sum(r["clipped"] for r in inj)
      flags = np.array([r["loss_spike"] for r in inj])
      np.testing.assert_array_equal(flags, naive_mask(probe, 10, 5.0))
      assert fig["spike_count"] == naive_runs(flags)
      assert fig["train_loss_spike_count"] == naive_runs(
          naive_mask(losses, 10, 5.0))
  # The repeat batches stand out: every run's injected norm is well above
  # its median, and the tight threshold lets through less than the loose.
  by = {e["method"]: e for e in summary["runs"]}
  assert by["none"]["inject_norm_ratio"] > 2
  assert by["clip@0.5"]["passed_norm_ratio"] < by["clip@4"][
      "passed_norm_ratio"]
  lr = _series(rows, "none", 0, "clean", "lr")
  assert lr[0] == 0.0 and max(lr) == pytest.approx(1e-2)
  assert lr[-1] == pytest.approx(1e-3, rel=0.05)


def test_probe_loss_and_first_norm_by_hand(demo):
  """Step 0 of each seed: the probe loss of the untrained model on the
  first held-out windows in float64 NumPy, and the norm of its gradient on
  the seed's first batch."""
  _, _, rows = demo
  cfg, _ = parse_args(TINY)
  corpus = load_corpus()
  t = cfg.seq_len
  windows = np.stack([corpus.heldout[i * t: i * t + t + 1]
                      for i in range(cfg.probe_size)]).astype(np.int32)
  for seed in SEEDS:
    model = make_model(cfg, seed)
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(
        model, jnp.asarray(windows[:, :-1])), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()
    batch = corpus.batch(seed, 0, cfg.batch_size, cfg.seq_len)
    grads = nnx.jit(nnx.grad(next_token_loss))(model, jnp.asarray(batch))
    norm = tree_norm64(jax.tree.leaves(grads))
    for r in rows:
      if r["step"] == 0 and r["seed"] == seed:
        assert r["probe_loss"] == pytest.approx(nll, rel=1e-5)
        assert r["grad_norm"] == pytest.approx(norm, rel=1e-5), r["method"]


def test_resume_continues_identically(demo, tmp_path):
  out, summary, rows = demo
  copy = tmp_path / "resumed"
  shutil.copytree(out, copy)
  # Lose the last checkpoints of the run with the most state (skip_spikes
  # around ZClip and AdamW), as if it died: the injected branch's only one
  # (at the end) of every seed, so that it restarts from the saved branch
  # point, and seed 1's clean branch at the end, so that it retrains from
  # step 20, before the branch point. The other runs are complete: resuming
  # them must read them back as they are.
  m = "zclip+skip"
  assert m in RUNS
  for s in SEEDS:
    shutil.rmtree(copy / m / f"seed{s}" / "injected" / "checkpoints" /
                  str(STEPS))
  shutil.rmtree(copy / m / "seed1" / "clean" / "checkpoints" / str(STEPS))
  resumed = spike_demo.main(TINY + ["--out", str(copy), "--resume"])
  again = _rows(copy)
  assert len(again) == len(rows)
  for a, b in zip(rows, again, strict=True):
    assert a == b, (a["method"], a["seed"], a["branch"], a["step"])
  for a, b in zip(summary["runs"], resumed["runs"], strict=True):
    assert a["eval_loss"] == b["eval_loss"]
    assert a["damage"] == b["damage"]


@pytest.mark.slow
def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
  args = TINY + ["--methods", "none", "--seeds", "1", "--steps", "31",
                 "--inject", "28", "--ckpt-every", "0"]
  spike_demo.main(args + ["--out", str(tmp_path), "--resume"])
  assert "--resume: nothing to resume" in capsys.readouterr().out


def test_rows_follow_the_telemetry_keys():
  """Host rows from synthetic step outputs, keyed as `optax_zclip.stats`
  keys them (``<kind>/<field>``): a spike is a step whose spike count
  exceeds the previous step's, across calls (chunks between checkpoints);
  threshold and tensor counts only where the telemetry has them; an
  infinite threshold (no clipping) is logged as None; a skipped step passed
  nothing on."""
  f32, i32 = np.float32, np.int32

  def step(stats):
    return {"loss": f32(2.5), "probe_loss": f32(2.25), "stats": stats}

  def zclip(count, clipped_norm):
    return step({"zclip/grad_norm": f32(4.0),
                 "zclip/clipped_norm": f32(clipped_norm),
                 "zclip/threshold": f32(3.0),
                 "zclip/spike_count": i32(count)})

  lr = lambda t: 0.5 * t  # noqa: E731
  out = [zclip(2, 4.0), zclip(3, 3.0), zclip(3, 4.0), zclip(5, 3.0)]
  first, last = host_rows(out[:2], 7, lr, {"zclip/spike_count": i32(2)},
                          "zclip")
  second, _ = host_rows(out[2:], 9, lr, last, "zclip")
  rows = first + second
  assert [r["step"] for r in rows] == [7, 8, 9, 10]
  assert [r["lr"] for r in rows] == [3.5, 4.0, 4.5, 5.0]
  assert [r["detected"] for r in rows] == [False, True, False, True]
  assert [r["clipped"] for r in rows] == [False, True, False, True]
  assert rows[0] == {"step": 7, "lr": 3.5, "loss": 2.5, "probe_loss": 2.25,
                     "grad_norm": 4.0, "clipped_norm": 4.0, "threshold": 3.0,
                     "detected": False, "clipped": False}
  adagc = step({"adagc/grad_norm": f32(4.0), "adagc/clipped_norm": f32(3.0),
                "adagc/num_clipped": i32(6)})
  (row,), _ = host_rows([adagc], 0, lr, {}, "adagc")
  assert row["threshold"] is None and row["tensors_clipped"] == 6
  assert "detected" not in row and row["clipped"]
  none = step({"clip/grad_norm": f32(4.0), "clip/clipped_norm": f32(4.0),
               "clip/threshold": f32(np.inf)})
  (row,), _ = host_rows([none], 0, lr, {}, "clip")
  assert row["threshold"] is None and not row["clipped"]
  assert set(row) == {"step", "lr", "loss", "probe_loss", "grad_norm",
                      "clipped_norm", "threshold", "clipped"}

  def skip(skipped, count):
    return step({"skip/grad_norm": f32(9.0), "skip/skipped": i32(skipped),
                 "zclip/grad_norm": f32(1.0), "zclip/clipped_norm": f32(1.0),
                 "zclip/threshold": f32(3.0),
                 "zclip/spike_count": i32(count)})

  (a, b), _ = host_rows([skip(1, 0), skip(0, 1)], 0, lr,
                        {"skip/skipped": i32(0), "zclip/spike_count": i32(0)},
                        "zclip")
  assert a["skipped"] and a["grad_norm"] == 9.0 and a["clipped_norm"] == 0.0
  assert a["clipped"] and not a["detected"]
  assert not b["skipped"] and b["clipped_norm"] == 1.0 and b["detected"]


def test_every_run_reads_its_own_kind_of_telemetry():
  """Each method's clipping state reports the keys its rows are read by."""
  cfg, _ = parse_args(["--methods", "none,clip,zclip,adagc,autoclip,"
                       "zclip+skip", "--clip-norms", "1"])
  for run in cfg.runs:
    model = make_model(cfg)
    keys = set(optax_zclip.stats(nnx.Optimizer(model, make_tx(run, cfg),
                                               wrt=nnx.Param)))
    kind = stats_kind(run)
    assert {f"{kind}/grad_norm", f"{kind}/clipped_norm"} <= keys, run
    assert ("skip/skipped" in keys) == (run == "zclip+skip"), run


def test_cli_help_prints_every_option(capsys):
  # argparse %-formats each help text: a bare "%" in one crashes --help.
  with pytest.raises(SystemExit) as e:
    parse_args(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "at 40% and 70% of the steps" in " ".join(out.split())
  assert "--inject-kind" in out and "--loss-scale" in out


@pytest.mark.parametrize("flag", ["--steps", "--probe-size", "--batch-size",
                                  "--seeds", "--horizon"])
def test_cli_rejects_non_positive_counts(flag, capsys):
  with pytest.raises(SystemExit) as e:
    parse_args([flag, "0"])
  assert e.value.code == 2
  assert f"{flag} must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--lr", "-1"], "--lr must be in (0, 10]"),
    (["--lr", "nan"], "--lr must be"),
    (["--seq-len", "100000"], "--seq-len 100000"),
    (["--inject", "250"], "--inject: steps must be in [0, 248]"),
    (["--inject", "5,x"], "--inject: expected comma-separated steps"),
    (["--steps", "20"], "--steps 20 leaves no room"),
    (["--clip-norms", "0,1"], "--clip-norms: expected positive numbers"),
    (["--methods", "none,bogus"], "--methods: unknown ['bogus']"),
    (["--d-model", "30", "--n-heads", "4"], "--d-model 30 must split"),
    (["--corpus", "/nonexistent/corpus.txt"], "--corpus: no such file"),
    (["--inject-kind", "zeros"], "--inject-kind"),
])
def test_cli_rejects_bad_input_in_one_line(args, says, capsys):
  with pytest.raises(SystemExit) as e:
    parse_args(args)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  # The usage, then the error on one line that names the option.
  (line,) = [x for x in err.splitlines() if "error:" in x]
  assert says in line and err.strip().endswith(line)


def test_cli_checks_the_corpus_against_the_sequence(tmp_path, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"")
  short = tmp_path / "short.txt"
  short.write_bytes(b"x" * 1000)
  for args, says in (
      (["--corpus", str(empty)], "has 0 training bytes"),
      (["--corpus", str(short), "--seq-len", "128"], "fewer than "
       "--probe-size"),
      (["--corpus", str(tmp_path)], "is a directory")):
    with pytest.raises(SystemExit):
      parse_args(args)
    assert says in capsys.readouterr().err
