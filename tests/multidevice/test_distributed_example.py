"""examples/distributed.py: every layout makes the single-device decisions."""

import pathlib
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.examples

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]
                       / "examples"))

import distributed  # noqa: E402


def test_dp_fsdp_and_shard_map_equal_one_device(capsys):
  r = distributed.main(["--steps", "30", "--spike-every", "12"])
  assert "shard_map" in capsys.readouterr().out
  single = r["single"]
  assert single["spike_count"] >= 2  # the two corrupted batches at least
  big = single["grad_norm"] > 10 * np.median(single["grad_norm"])
  assert big.sum() == 2 and (single["clipped_norm"][big] < 5).all()
  for mode in ("dp", "fsdp", "shard_map"):
    np.testing.assert_allclose(r[mode]["losses"], single["losses"],
                               rtol=1e-4, err_msg=mode)
    np.testing.assert_allclose(r[mode]["clipped_norm"],
                               single["clipped_norm"], rtol=1e-4,
                               err_msg=mode)
    assert r[mode]["spike_count"] == single["spike_count"], mode
