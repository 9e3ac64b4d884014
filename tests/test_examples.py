"""The examples run, briefly, and show what they claim."""

import pathlib
import sys

import pytest

pytestmark = pytest.mark.examples

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import quickstart  # noqa: E402


def test_quickstart_clips_every_glitch_and_beats_no_clipping(capsys):
  r = quickstart.main(["--steps", "150", "--spike-every", "40"])
  out = capsys.readouterr().out
  assert "zclip" in out and "glitch" in out
  z = r["zclip"]
  assert z["glitches"] == 3 and z["clipped_glitches"] == 3
  assert z["spike_count"] >= 3
  # The fixed threshold clips them too; measuring only clips nothing.
  assert r["clip_by_global_norm(1.0)"]["clipped_glitches"] == 3
  assert r["no clipping"]["clipped_glitches"] == 0
  # A 40x corrupted batch without clipping inflates Adam's second moment for
  # hundreds of steps; both clipping methods avoid that.
  assert z["eval_loss"] < 0.5 * r["no clipping"]["eval_loss"]
  assert r["clip_by_global_norm(1.0)"]["eval_loss"] < 0.5 * r[
      "no clipping"]["eval_loss"]
