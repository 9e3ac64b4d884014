"""MaxText's own pre-training loop, with ZClip and skip_spikes in its optimizer.

Each run is MaxText 0.2.5's entry point (`run_maxtext.py`: its config
system, train loop, sharding, Orbax checkpointing and metric writer) on CPU,
with the Integrations guide's patch (`maxtext_zclip.py`) applied, and each
test reads what the run itself wrote: the metrics file, the Orbax
checkpoints and the TensorBoard directory. CI's MaxText job runs them
(`bash .ci/maxtext`), in a venv of their own; pytest collects them only with
``OPTAX_ZCLIP_MAXTEXT=1``.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

if os.environ.get("OPTAX_ZCLIP_MAXTEXT") != "1":  # named on the command line
  pytest.skip("needs MaxText's venv: run `bash .ci/maxtext test`",
              allow_module_level=True)

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "benchmarks"))

import maxtext_memory  # noqa: E402
import run_maxtext  # noqa: E402

import optax_zclip  # noqa: E402

STEPS = 12  # checkpoints after steps 0, 6 and 11 (the last: all 12 taken)
SPIKE_STEP, SPIKE_SCALE = 8, 30.0
# float32 rounding between two summation orders: a few units in the last
# place (float32's epsilon is 1.2e-7).
F32 = 1e-6


class Run:
  """What one MaxText run wrote: ``run`` is its directory (the config's
  base_output_directory/run_name), ``metrics`` its metrics_file."""

  def __init__(self, run: pathlib.Path, metrics: pathlib.Path, stderr: str):
    self.run, self.stderr = run, stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
    self.rows = rows

  def metric(self, name: str) -> np.ndarray:
    return np.array([r[name] for r in self.rows])

  def checkpoint(self, step: int = STEPS - 1) -> dict:
    """The checkpoint MaxText saved after ``step``, restored by Orbax as
    NumPy arrays (no devices needed; the 8-device ones restore too)."""
    import jax  # noqa: PLC0415
    import orbax.checkpoint as ocp  # noqa: PLC0415
    path = self.items(step)
    checkpointer = ocp.PyTreeCheckpointer()
    as_numpy = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
        checkpointer.metadata(path).item_metadata.tree)
    return checkpointer.restore(
        path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))

  def metadata(self, step: int = STEPS - 1) -> dict:
    import orbax.checkpoint as ocp  # noqa: PLC0415
    return ocp.PyTreeCheckpointer().metadata(
        self.items(step)).item_metadata.tree

  def items(self, step: int) -> pathlib.Path:
    return self.run / "checkpoints" / str(step) / "items"


def train(out: pathlib.Path, *flags: str, devices: int = 1,
          overrides: tuple[str, ...] = ()) -> Run:
  """Runs MaxText's trainer through the launcher; the same global batch
  (8 sequences) on one device or on 8 with MaxText's FSDP."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if devices == 1:
    batch = ["per_device_batch_size=8"]
  else:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    batch = ["per_device_batch_size=1", f"ici_fsdp_parallelism={devices}"]
  command = [
      sys.executable, str(HERE / "run_maxtext.py"), *flags, "--",
      *run_maxtext.TINY, *batch, f"steps={STEPS}", "run_name=run",
      f"base_output_directory={out}", f"metrics_file={out}/metrics.jsonl",
      "enable_checkpointing=true", "async_checkpointing=false",
      "checkpoint_period=6", *overrides]
  done = subprocess.run(command, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-6000:]
  return Run(out / "run", out / "metrics.jsonl", done.stderr)


def guide_blocks(language: str) -> list[str]:
  """The ``language`` code blocks of the Integrations guide's MaxText
  section."""
  text = (ROOT / "docs" / "guides" / "integrations.md").read_text()
  section = text.split("\n### MaxText\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(rf"^```{language}\n(.*?)^```$", section,
                    re.MULTILINE | re.DOTALL)


def test_the_guide_shows_the_files_the_tests_run():
  assert guide_blocks("python") == [
      (HERE / name).read_text() for name in ("maxtext_zclip.py",
                                             "train_zclip.py")]
  install, run = guide_blocks("bash")
  # What .ci/maxtext installs.
  assert '"maxtext[tpu]==0.2.5"' in install
  assert '"maxtext[tpu]==0.2.5"' in (ROOT / ".ci" / "maxtext").read_text()
  # The guide's run is the tiny run the other tests make.
  for override in run_maxtext.TINY:
    assert override in run.split(), override


def guide_run(tmp_path: pathlib.Path) -> tuple[Run, str]:
  """The guide's two files and its run command (its second bash block),
  as a user would: in a directory of their own. Returns the run and what
  the command printed (the replay's report)."""
  for name in ("maxtext_zclip.py", "train_zclip.py"):
    shutil.copy(HERE / name, tmp_path / name)
  env = dict(os.environ, PATH=os.pathsep.join(
      [str(pathlib.Path(sys.executable).parent), os.environ["PATH"]]))
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(["bash", "-euo", "pipefail", "-c",
                         guide_blocks("bash")[1]], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-6000:]
  return (Run(tmp_path / "runs" / "zclip", tmp_path / "runs" / "zclip.jsonl",
              done.stderr), done.stdout)


def test_zclip_runs_in_maxtext_and_fsdp_matches_one_device(tmp_path):
  one, report = guide_run(tmp_path)
  # The guide's replay read the run's TensorBoard directory.
  assert "norms from 'learning/raw_grad_norm'" in " ".join(report.split())
  fsdp = train(tmp_path / "fsdp", "--zclip", devices=8)

  # ZClip ran: its state is in MaxText's checkpoint, first in the chain,
  # and counted every step.
  zclip = one.checkpoint()["opt_state"][0]
  assert set(zclip) == set(optax_zclip.ZClipState._fields)
  assert int(zclip["count"]) == STEPS
  assert int(one.checkpoint(6)["opt_state"][0]["count"]) == 7
  # ... on the gradients MaxText logs as raw: its norm is MaxText's.
  raw = one.metric("learning/raw_grad_norm")
  assert float(zclip["grad_norm"]) == pytest.approx(raw[-1], rel=F32)
  # With the fixed clipping off, MaxText's clipped norm is the raw one.
  np.testing.assert_array_equal(one.metric("learning/grad_norm"), raw)

  # On 8 devices: ZClip's scalars are replicated over MaxText's mesh, while
  # AdamW's moments are sharded over 'fsdp' like the parameters.
  meta = fsdp.metadata()
  for name, leaf in meta["opt_state"][0].items():
    assert tuple(leaf.sharding.partition_spec) == (), name
    assert int(np.prod(leaf.sharding.shape)) == 8, name
  mu = meta["opt_state"][1]["0"]["mu"]["token_embedder"]["embedding"]
  assert "fsdp" in tuple(mu.sharding.partition_spec)

  # ... and the two runs agree to float32 rounding, step by step.
  np.testing.assert_allclose(fsdp.metric("learning/raw_grad_norm"), raw,
                             rtol=F32)
  np.testing.assert_allclose(fsdp.metric("learning/loss"),
                             one.metric("learning/loss"), rtol=F32)
  for step in (0, 6, STEPS - 1):
    a = one.checkpoint(step)["opt_state"][0]
    b = fsdp.checkpoint(step)["opt_state"][0]
    assert int(a["count"]) == int(b["count"]) == step + 1
    for field in ("grad_norm", "clipped_norm", "mean", "threshold"):
      assert float(b[field]) == pytest.approx(float(a[field]), rel=F32)
    # The variance of nearly equal norms: a difference of close numbers,
    # so its rounding is relative to the norm squared.
    assert float(b["var"]) == pytest.approx(float(a["var"]),
                                            abs=F32 * float(a["mean"]) ** 2)


def test_skip_spikes_skips_a_bad_batch_in_maxtext_and_replays(tmp_path):
  run = train(tmp_path, "--zclip", "--skip-spikes",
              "--spike-step", str(SPIKE_STEP),
              "--spike-scale", str(SPIKE_SCALE),
              overrides=("skip_step_on_spikes=true", "skip_step_interval=8",
                         "skip_step_scaling_factor=6"))
  # The loss reached skip_spikes (no warning that it tested the norm alone),
  # and its zero-copy select ran (no fallback to a copy of the state).
  assert "SkipSpikes" not in run.stderr

  loss = run.metric("learning/loss")
  norm = run.metric("learning/raw_grad_norm")
  params = run.metric("learning/param_norm")
  s = SPIKE_STEP
  # The bad step left the parameters exactly as they were, and only it:
  assert params[s] == params[s - 1]
  assert all(params[t] != params[t - 1] for t in range(1, STEPS) if t != s)
  # so the next step saw the same model on the same batch: its loss and
  # norm are the bad step's over the spike's scale.
  assert loss[s] == pytest.approx(SPIKE_SCALE * loss[s + 1], rel=F32)
  assert norm[s] == pytest.approx(SPIKE_SCALE * norm[s + 1], rel=10 * F32)

  state = run.checkpoint()["opt_state"]
  assert set(state) == set(optax_zclip.SkipSpikesState._fields)
  assert int(state["skip_count"]) == 1
  assert int(state["nonfinite_count"]) == 0
  assert bool(np.all(state["has_loss"]))  # every step's loss got through
  # ZClip and AdamW, inside the skip, did not count the skipped step.
  # (Orbax restores a tuple below the top as a dict with keys "0", "1".)
  zclip, adamw = state["inner_state"]["0"], state["inner_state"]["1"]["0"]
  assert set(zclip) == set(optax_zclip.ZClipState._fields)
  assert int(zclip["count"]) == int(adamw["count"]) == STEPS - 1
  # None of steps 0 to 6 was skipped.
  assert int(run.checkpoint(6)["opt_state"]["skip_count"]) == 0

  # `optax-zclip replay` reads the run's TensorBoard directory, and its
  # skip_spikes with the run's window skips the same step.
  out = tmp_path / "replay"
  replay = subprocess.run(
      [sys.executable, "-m", "optax_zclip", "replay",
       str(run.run / "tensorboard"), "--methods", "skip:window=8",
       "--out", str(out), "--no-plot"],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
      text=True, timeout=300)
  assert replay.returncode == 0, replay.stderr[-4000:]
  assert "norms from 'learning/raw_grad_norm'" in " ".join(
      replay.stdout.split())
  lines = (out / "replay.csv").read_text().splitlines()
  header = lines[0].split(",")
  skipped = [int(r.split(",")[0]) for r in lines[1:]
             if r.split(",")[header.index("skip:window=8/skipped")] == "1"]
  assert skipped == [SPIKE_STEP]


def test_memory_of_maxtexts_compiled_train_step():
  rows = maxtext_memory.table()
  base = rows["adamw"]
  params = base["param_bytes"]
  assert all(r["param_bytes"] == params for r in rows.values())
  for name, r in rows.items():
    extra_temp = r["temp_size_in_bytes"] - base["temp_size_in_bytes"]
    extra_args = r["argument_size_in_bytes"] - base["argument_size_in_bytes"]
    # No wrapper copies the optimizer state (AdamW's moments are 2x the
    # parameters): each adds less than a quarter of the parameters' bytes
    # of temporaries, and only scalars and the skip window to the state.
    assert extra_temp < params / 4, (name, extra_temp, params)
    assert extra_args < 1024, (name, extra_args)
  # This package's skip_spikes costs what MaxText's own skip wrapper costs.
  ours = rows["skip_spikes(adamw)"]["temp_size_in_bytes"]
  theirs = rows["skip_step_on_spikes(adamw)"]["temp_size_in_bytes"]
  assert ours - theirs < params / 100
