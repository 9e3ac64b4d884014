"""Memory of MaxText's own compiled train step, with each optimizer.

Runs MaxText 0.2.5's pre-training entry point (in the venv `bash .ci/maxtext
install` builds) once per variant, in a process of its own, on the tiny
decoder of `tests/maxtext/run_maxtext.py`, and keeps the
``memory_analysis()`` of the train step MaxText compiles before its first
step (the one it trains with: donated state, its sharding, its remat), then
prints its temp, argument, output and alias bytes:

* ``adamw``: MaxText's own optimizer, unpatched;
* ``zclip+adamw``: the Integrations guide's patch, ZClip first;
* ``skip_step_on_spikes(adamw)``: MaxText's own skip wrapper
  (``skip_step_on_spikes=true``), unpatched;
* ``skip_spikes(adamw)`` and ``skip_spikes(zclip+adamw)``: the guide's
  patch with this package's `skip_spikes` in its place.

The last column is the temp bytes over bare AdamW's, in units of the
parameters' bytes. XLA's buffer assignment is deterministic: the numbers do
not depend on the machine's load.

  .venv-maxtext/bin/python benchmarks/maxtext_memory.py
  .venv-maxtext/bin/python benchmarks/maxtext_memory.py --devices 8 \\
      -- ici_fsdp_parallelism=8 per_device_batch_size=1
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "tests" / "maxtext" / "run_maxtext.py"
sys.path.insert(0, str(LAUNCHER.parent))

import run_maxtext  # noqa: E402

SKIP = ["skip_step_on_spikes=true", "skip_step_interval=8"]
# name -> (the launcher's flags, MaxText overrides)
VARIANTS = {
    "adamw": ([], []),
    "zclip+adamw": (["--zclip"], []),
    "skip_step_on_spikes(adamw)": ([], SKIP),
    "skip_spikes(adamw)": (["--skip-spikes"], SKIP),
    "skip_spikes(zclip+adamw)": (["--zclip", "--skip-spikes"], SKIP),
}
FIELDS = ("temp_size_in_bytes", "argument_size_in_bytes",
          "output_size_in_bytes", "alias_size_in_bytes")


def measure(name: str, devices: int = 1,
            overrides: tuple[str, ...] = ()) -> dict[str, int]:
  """The memory_analysis() numbers of one variant's compiled train step,
  and ``param_bytes``."""
  flags, own = VARIANTS[name]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if devices > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}")
  with tempfile.TemporaryDirectory() as out:
    numbers = pathlib.Path(out) / "memory.json"
    # A global batch of 8 sequences, unless the overrides say otherwise.
    batch = [] if any(o.startswith("per_device_batch_size=")
                      for o in overrides) else ["per_device_batch_size=8"]
    command = [sys.executable, str(LAUNCHER), *flags,
               "--memory-json", str(numbers), "--",
               *run_maxtext.TINY, *batch, "steps=1",
               "enable_checkpointing=false", "run_name=memory",
               f"base_output_directory={out}", *own, *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not numbers.exists():
      raise RuntimeError(f"{name}: MaxText failed\n{done.stderr[-4000:]}")
    return json.loads(numbers.read_text())


def table(devices: int = 1, overrides: tuple[str, ...] = ()
          ) -> dict[str, dict[str, int]]:
  return {name: measure(name, devices, overrides) for name in VARIANTS}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=1,
                      help="simulated CPU devices (XLA_FLAGS)")
  parser.add_argument("overrides", nargs="*",
                      help="more MaxText KEY=VALUE overrides")
  args = parser.parse_args(argv)
  rows = table(args.devices, tuple(args.overrides))
  base = rows["adamw"]
  print(f"parameters: {base['param_bytes']} bytes; {args.devices} device(s)")
  print("| variant | temp | argument | output | alias | extra temp "
        "over adamw, x params |")
  print("|---|---|---|---|---|---|")
  for name, r in rows.items():
    extra = (r["temp_size_in_bytes"] - base["temp_size_in_bytes"]) / r[
        "param_bytes"]
    print(f"| {name} | " + " | ".join(str(r[f]) for f in FIELDS) +
          f" | {extra:+.2f} |")


if __name__ == "__main__":
  main()
