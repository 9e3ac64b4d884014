"""The benchmark scripts: a tiny run of each, and their shared variants."""

import importlib
import pathlib
import re
import shlex
import sys

import jax
import optax
import pytest

import optax_zclip

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import step_overhead  # noqa: E402
import variants  # noqa: E402

# The names only: the learning rate is each script's.
SHARED = variants.table(1e-3)


def test_shared_table_has_each_clipping_transform():
  # Derived from the package: a transform it stops finding is a failure
  # here, not a row missing from every benchmark.
  assert set(variants.CLIPPERS) >= {"zclip", "adagc", "autoclip",
                                    "clip_by_global_norm"}
  for name in variants.CLIPPERS:
    assert SHARED[f"{name}+adamw"].takes_value is False
    assert SHARED[f"skip_spikes({name}+adamw)"].takes_value is True
  assert {"adamw", "skip_spikes(adamw)",
          "optax.clip_by_global_norm+adamw"} <= set(SHARED)


# What each script adds to the shared table: rows of its own.
OWN = {
    "compile_time": {"clip_by_global_norm", "optax.tree.norm+scale"},
    "memory": {"optax.apply_if_finite(adamw)"},
    "step_overhead": set(),
    "train_step": set(),
}
# train_step.py imports flax and the spike demo's model.
SCRIPTS = ["compile_time", "memory", "step_overhead",
           pytest.param("train_step", marks=pytest.mark.examples)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_names_its_variants_from_the_shared_table(script):
  assert set(importlib.import_module(script).VARIANTS) == set(SHARED) | OWN[
      script]


def _documented_variants() -> dict[str, set[str]]:
  """script -> the names the Performance guide passes it in ``--variants``."""
  text = (ROOT / "docs" / "guides" / "performance.md").read_text()
  out = {}
  for command in re.findall(r"^python benchmarks/.*$",
                            text.replace("\\\n", " "), re.MULTILINE):
    words = shlex.split(command)
    if "--variants" in words:
      names = words[words.index("--variants") + 1].split(",")
      out.setdefault(pathlib.Path(words[1]).stem, set()).update(names)
  return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_guide_uses_the_scripts_variant_names(script):
  documented = _documented_variants()
  assert {"compile_time", "train_step"} <= set(documented)
  names = set(importlib.import_module(script).VARIANTS)
  assert documented.get(script, set()) <= names


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


@pytest.mark.examples
def test_train_step_tiny_run(capsys):
  import train_step  # noqa: PLC0415 (imports flax and the demo's model)

  # Bare AdamW and skip_spikes around a chain (which passes value=loss):
  # each variant compiles twice, so all seven would take too long for a test.
  variants = ["adamw", "skip_spikes(zclip+adamw)"]
  train_step.main(["--sizes", "tiny", "--rounds", "1", "--iters", "1",
                   "--compile-reps", "1", "--variants", ",".join(variants)])
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith("| ")]
  names = [r.split("|")[1].strip() for r in rows[1:]]
  assert names == variants
  for r in rows[1:]:
    cells = [c.strip() for c in r.strip("|").split("|")]
    assert len(cells) == 4 and float(cells[1]) > 0 and float(cells[3]) > 0
    # "median [min, max]" of the per-round overheads, in percent.
    med, lo, hi = map(float, cells[2].replace("[", "").replace("]", "")
                      .replace(",", "").split())
    assert lo <= med <= hi
  assert rows[1].split("|")[1].strip() == train_step.BARE


def _compile_rows(out):
  """(variant, donated, barrier, [trace, lower, compile, total, ratio])."""
  rows = [[c.strip() for c in line.strip("|").split("|")]
          for line in out.splitlines() if line.startswith("| ")][1:]
  return [(r[0], r[1], r[2], [float(c) for c in r[3:]]) for r in rows]


def test_compile_time_tiny_run(capsys):
  import compile_time  # noqa: PLC0415

  variants = ["adamw", compile_time.BASE, "skip_spikes(zclip+adamw)"]
  compile_time.main(["--leaves", "3", "--reps", "1",
                     "--variants", ",".join(variants)])
  rows = _compile_rows(capsys.readouterr().out)
  assert [r[:3] for r in rows] == [("adamw", "yes", "-"),
                                   (compile_time.BASE, "yes", "-"),
                                   ("skip_spikes(zclip+adamw)", "yes", "on")]
  for _, _, _, (trace, lower, comp, total, _) in rows:
    assert min(trace, lower, comp) > 0
    assert total == pytest.approx(trace + lower + comp, abs=0.02)
  # The base's own ratio is 1 by definition of the column.
  assert rows[1][3][4] == 1.0


def test_compile_time_barrier_off_rows_and_jax_restored(capsys):
  import compile_time  # noqa: PLC0415

  real = jax.lax.optimization_barrier
  compile_time.main(["--leaves", "2", "--reps", "1", "--shapes", "random",
                     "--dtype", "float32", "--donate", "both",
                     "--barrier", "on,off", "--variants",
                     f"{compile_time.BASE},zclip+adamw"])
  rows = _compile_rows(capsys.readouterr().out)
  # The base once per donation (the barrier is not in it), this package's
  # variant with and without the barrier; ratios to the base of the same
  # donation.
  assert [r[:3] for r in rows] == [
      (compile_time.BASE, "yes", "-"), ("zclip+adamw", "yes", "on"),
      ("zclip+adamw", "yes", "off"), (compile_time.BASE, "no", "-"),
      ("zclip+adamw", "no", "on"), ("zclip+adamw", "no", "off")]
  assert rows[0][3][4] == rows[3][3][4] == 1.0
  assert jax.lax.optimization_barrier is real
  # Without the barrier, the step has none: what the rows compare.
  params = compile_time.tree(2, "random", "float32")
  tx = optax.chain(optax_zclip.zclip(), optax.adamw(1e-3))
  state = tx.init(params)

  def jaxpr_text():
    return str(jax.make_jaxpr(lambda g, s: tx.update(g, s, params))(params,
                                                                    state))

  assert "optimization_barrier" in jaxpr_text()
  with compile_time.barrier(False):
    assert "optimization_barrier" not in jaxpr_text()
