"""benchmarks/step_overhead.py: a tiny run of it."""

import pathlib
import sys


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "benchmarks"))

import step_overhead  # noqa: E402


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
