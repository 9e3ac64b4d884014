"""`optax_zclip.replay`, the engine: its results and its method specs.

Every number is checked against an independent computation: the float64
models of `references.py` (which never run the package), ``min(g, 1)``, or
what a ZClip run of the spike demo logged. The series are short and share
their lengths and methods, so that the replays reuse a handful of compiled
scans; one test replays 100,000 steps.
"""

import csv
import math
import time

import numpy as np
import optax
import pytest
from references import AutoClipRef, SkipSpikesRef, ZClipRef

import optax_zclip
from optax_zclip._replay import _engine, _methods

N = 300
SPIKES = {60: 9.0, 61: 5.0, 150: 25.0, 220: 3.5, 270: 12.0}
NAN_STEP, INF_STEP, LOSS_SPIKE, NO_LOSS = 100, 180, 250, 200
# zclip with its defaults (max_grad_norm=1.0) and a sweep of z_thresh: one
# vmapped scan; the fixed threshold; AutoClip and the skip rule with short
# windows, so that they act within N steps.
METHODS = ("zclip,zclip:z_thresh=2|3,clip@1,autoclip:window=64,"
           "skip:window=40,sigma=4")
ZCLIPS = {"zclip": 2.5, "zclip:z_thresh=2": 2.0, "zclip:z_thresh=3": 3.0}


def _series():
  """Norms falling from about 1 to 0.6 with noise, spikes at known steps,
  a NaN and an Inf; losses with a spike where the norm is normal, and one
  step without a loss. Float32 values, so both sides see the same numbers."""
  rng = np.random.default_rng(7)
  t = np.arange(N)
  g = (0.6 + 0.4 * np.exp(-t / 40)) * np.exp(0.12 * rng.standard_normal(N))
  for step, factor in SPIKES.items():
    g[step] *= factor
  g[NAN_STEP], g[INF_STEP] = np.nan, np.inf
  loss = 3.0 - 0.5 * t / N + 0.03 * rng.standard_normal(N)
  loss[150] += 2.0
  loss[LOSS_SPIKE] += 1.5
  g = g.astype(np.float32).astype(np.float64)
  losses = [float(np.float32(x)) for x in loss]
  losses[NO_LOSS] = None
  return g, losses


G, LOSSES = _series()


@pytest.fixture(scope="module")
def result():
  return optax_zclip.replay(G, LOSSES, METHODS)


def _zclip_reference(g, **kwargs):
  """(threshold, out_norm, clipped, capped) per step, from the float64
  model."""
  ref = ZClipRef(**kwargs)
  cap = math.inf if ref.max_grad_norm is None else ref.max_grad_norm
  thr, out, clipped, capped = [], [], [], []
  for x in g:
    if ref.initialized:
      thr.append(min(ref.mean + ref.z_thresh * (math.sqrt(ref.var) + ref.eps),
                     cap))
    else:
      thr.append(cap)
    decision = ref.step(float(x))
    out.append(x * decision["scale"])
    clipped.append(decision["scale"] < 1.0)
    capped.append(decision["capped"])
  return np.array(thr), np.array(out), np.array(clipped), np.array(capped)


def test_zclip_and_its_sweep_match_the_float64_reference(result):
  assert list(result)[:2] == ["step", "grad_norm"]
  np.testing.assert_array_equal(result["step"], np.arange(N))
  np.testing.assert_array_equal(result["grad_norm"], G)
  for name, z in ZCLIPS.items():
    thr, out, clipped, capped = _zclip_reference(G, z_thresh=z)
    np.testing.assert_allclose(result[f"{name}/threshold"], thr, rtol=1e-4)
    np.testing.assert_allclose(result[f"{name}/out_norm"], out, rtol=1e-4)
    np.testing.assert_array_equal(result[f"{name}/clipped"], clipped)
    np.testing.assert_array_equal(result[f"{name}/capped"], capped)
    assert f"{name}/skipped" not in result
    # Every spike after the warm-up is clipped; the non-finite steps pass.
    assert all(result[f"{name}/clipped"][s] for s in SPIKES)
    assert not result[f"{name}/clipped"][[NAN_STEP, INF_STEP]].any()
  # A lower z_thresh clips at least every step a higher one clips.
  low, mid, high = (result[f"{n}/clipped"] for n in
                    ("zclip:z_thresh=2", "zclip", "zclip:z_thresh=3"))
  assert (low >= mid).all() and (mid >= high).all() and low.sum() > high.sum()


def test_clip_at_1_is_min_of_the_norm_and_1(result):
  with np.errstate(invalid="ignore"):
    # NaN and Inf pass through, as non-finite steps.
    expected = np.where(np.isfinite(G) & (G > 1.0), 1.0, G)
  np.testing.assert_array_equal(result["clip@1/out_norm"],
                                expected.astype(np.float32))
  np.testing.assert_array_equal(result["clip@1/clipped"],
                                np.isfinite(G) & (G > 1.0))
  np.testing.assert_array_equal(result["clip@1/threshold"], np.ones(N))


def test_autoclip_matches_the_float64_reference(result):
  ref = AutoClipRef(percentile=10.0, window=64)
  scale, thr = np.array([ref.step(float(x)) for x in G]).T
  np.testing.assert_allclose(result["autoclip:window=64/threshold"], thr,
                             rtol=1e-5)
  np.testing.assert_allclose(result["autoclip:window=64/out_norm"],
                             G * scale, rtol=1e-5)
  np.testing.assert_array_equal(result["autoclip:window=64/clipped"],
                                scale < 1)


def test_skip_with_losses_matches_the_float64_reference(result):
  ref = SkipSpikesRef(window=40, sigma=4.0)
  steps = [ref.step(float(x), loss) for x, loss in zip(G, LOSSES,
                                                      strict=True)]
  skip = np.array([s["skip"] for s in steps])
  name = "skip:window=40,sigma=4"
  np.testing.assert_array_equal(result[f"{name}/skipped"], skip)
  np.testing.assert_allclose(result[f"{name}/threshold"],
                             [s["norm_threshold"] for s in steps], rtol=1e-4)
  np.testing.assert_array_equal(result[f"{name}/out_norm"],
                                np.where(skip, 0.0, G).astype(np.float32))
  # Every skipped step counts as clipped, the NaN and Inf ones included
  # (whose norm after, 0, is not below theirs).
  np.testing.assert_array_equal(result[f"{name}/clipped"], skip)
  # The norm spikes (not 61: 60's spike entered the window and widened it),
  # the non-finite steps and the loss spike, a step whose norm is ordinary.
  assert np.flatnonzero(skip).tolist() == sorted(
      [60, 150, 220, 270, NAN_STEP, INF_STEP, LOSS_SPIKE])
  assert steps[LOSS_SPIKE]["loss_out"] and not steps[LOSS_SPIKE]["norm_out"]


@pytest.mark.examples
def test_replays_what_a_zclip_run_of_the_demo_logged(spike_demo_run):
  """The demo's ZClip run (and its ZClip inside skip_spikes) logged each
  step's norm before clipping, threshold and decisions; replaying those
  norms with that run's settings gives them back, step for step."""
  from test_spike_demo import TINY

  from config import parse_args  # the demo's, on sys.path via the fixture
  _, _, rows = spike_demo_run
  cfg, _ = parse_args(TINY)
  zclip_args = dict(alpha=cfg.zclip_alpha, z_thresh=cfg.zclip_z_thresh,
                    warmup_steps=cfg.zclip_warmup_steps, max_grad_norm=None)
  spec = ("zclip:" + ",".join(f"{k}={v}" for k, v in zclip_args.items()))
  with_skip = optax_zclip.skip_spikes(optax_zclip.zclip(**zclip_args),
                                      window=cfg.skip_window,
                                      sigma=cfg.skip_sigma)
  for seed in (0, 1):
    for branch in ("clean", "injected"):
      run = [r for r in rows if (r["method"], r["seed"], r["branch"]) ==
             ("zclip", seed, branch)]
      out = optax_zclip.replay([r["grad_norm"] for r in run],
                               methods={"z": spec})
      logged = np.array([math.inf if r["threshold"] is None
                         else r["threshold"] for r in run])
      np.testing.assert_array_equal(out["z/threshold"], logged)
      for key in ("clipped", "detected"):
        np.testing.assert_array_equal(out["z/clipped"],
                                      [r[key] for r in run])
      np.testing.assert_allclose(out["z/out_norm"],
                                 [r["clipped_norm"] for r in run], rtol=1e-6)
      assert out["z/clipped"].any() or branch == "clean"

      run = [r for r in rows if (r["method"], r["seed"], r["branch"]) ==
             ("zclip+skip", seed, branch)]
      out = optax_zclip.replay([r["grad_norm"] for r in run],
                               [r["loss"] for r in run],
                               methods={"zs": with_skip})
      np.testing.assert_array_equal(out["zs/skipped"],
                                    [r["skipped"] for r in run])
      np.testing.assert_array_equal(out["zs/clipped"],
                                    [r["clipped"] for r in run])
      np.testing.assert_allclose(out["zs/out_norm"],
                                 [r["clipped_norm"] for r in run], rtol=1e-6)


def _write_wandb_csv(path, with_steps=True):
  """The series as a W&B export: ``_step``, the train columns, and an
  evaluation row every 50 steps with the train cells empty."""
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow((["_step"] if with_steps else []) +
               ["train/grad_norm", "train/loss", "eval/loss"])
    for t, (g, loss) in enumerate(zip(G, LOSSES, strict=True)):
      head = [2 * t] if with_steps else []
      w.writerow(head + [repr(float(g)), "" if loss is None else repr(loss),
                       ""])
      if t % 50 == 49:
        w.writerow(([2 * t + 1] if with_steps else []) + ["", "", "2.5"])


def test_method_specs_and_sweeps():
  names = [n for n, _ in _methods._parse_methods(
      "zclip:z_thresh=2.5,alpha=0.97,clip@0.5|1,skip:sigma=5|6,window=64")]
  assert names == ["zclip:z_thresh=2.5,alpha=0.97", "clip@0.5", "clip@1",
                   "skip:sigma=5,window=64", "skip:sigma=6,window=64"]
  names = [n for n, _ in _methods._parse_methods(
      ["zclip:z_thresh=2|3,alpha=0.9|0.99"])]
  assert names == ["zclip:z_thresh=2,alpha=0.9", "zclip:z_thresh=2,alpha=0.99",
                   "zclip:z_thresh=3,alpha=0.9", "zclip:z_thresh=3,alpha=0.99"]
  with pytest.raises(ValueError, match="named twice"):
    _methods._parse_methods("clip@1,clip@1")
  with pytest.raises(ValueError, match="AdaGC"):
    optax_zclip.replay([1.0], methods={"a": optax_zclip.adagc()})
  with pytest.raises(ValueError, match="no clipping or skipping state"):
    optax_zclip.replay([1.0], methods={"a": optax.sgd(1.0)})
  with pytest.raises(ValueError, match="`norms` is empty"):
    optax_zclip.replay([])
  with pytest.raises(ValueError, match="one entry per norm"):
    optax_zclip.replay([1.0, 2.0], [1.0])


def test_100k_steps_compile_once_per_group_and_run_in_seconds():
  rng = np.random.default_rng(0)
  g = np.exp(0.2 * rng.standard_normal(100_000))
  losses = 2.0 + 0.01 * rng.standard_normal(100_000)
  before = _engine._run._cache_size()
  start = time.perf_counter()
  out = optax_zclip.replay(
      g, losses, "zclip:z_thresh=2|2.5|3,max_grad_norm=none,clip@1,skip")
  seconds = time.perf_counter() - start
  # Three groups: the three ZClips are one vmapped scan.
  assert _engine._run._cache_size() - before == 3
  assert seconds < 30
  # g * (1 / g) may be 1 - 2**-24 in float32.
  np.testing.assert_allclose(out["clip@1/out_norm"], np.minimum(g, 1.0),
                             rtol=1e-6)
  counts = [out[f"zclip:z_thresh={z},max_grad_norm=none/clipped"].sum()
            for z in (2, 2.5, 3)]
  assert counts[0] > counts[1] > counts[2] > 0
