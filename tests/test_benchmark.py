"""benchmarks/step_overhead.py: its floor transform and a tiny run of it."""

import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "benchmarks"))

import step_overhead  # noqa: E402


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_fused_clip_matches_a_float64_clip(max_norm):
  rng = np.random.default_rng(0)
  tree = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(7)}
  tx = step_overhead.fused_clip(max_norm)
  out, _ = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in tree.items()},
                     tx.init(None))
  norm = np.sqrt(sum((v ** 2).sum() for v in tree.values()))
  scale = min(1.0, max_norm / norm)
  for k, v in tree.items():
    np.testing.assert_allclose(out[k], v * scale, rtol=1e-6)


def test_tiny_run_prints_every_variant(capsys):
  step_overhead.main(["--params", "4096", "--leaves", "4", "--rounds", "2",
                      "--iters", "1"])
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith("| ")]
  names = [r.split("|")[1].strip() for r in rows[1:]]
  assert set(names) == set(step_overhead.VARIANTS)
  for r in rows[1:]:
    cells = [c.strip() for c in r.strip("|").split("|")]
    assert len(cells) == 6 and float(cells[1]) > 0 and float(cells[5]) > 0
    # Each ratio column is "median [min, max]" of the per-round ratios.
    for cell in cells[2:5]:
      med, lo, hi = map(float, cell.replace("[", "").replace("]", "")
                        .replace(",", "").split())
      assert 0 < lo <= med <= hi
