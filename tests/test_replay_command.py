"""The ``optax-zclip replay`` command (also ``python -m optax_zclip
replay``): what it writes and prints, and its errors."""

import contextlib
import csv
import importlib
import importlib.util
import inspect
import os
import pathlib
import pkgutil
import subprocess
import sys

import numpy as np
import pytest
from test_replay import (
  LOSSES,
  METHODS,
  G,
  N,
  _write_wandb_csv,
  _zclip_reference,
)

import optax_zclip
from optax_zclip import _cli
from optax_zclip._replay import _report


def test_cli_on_a_wandb_csv(tmp_path, capsys):
  log, out = tmp_path / "run.csv", tmp_path / "out"
  _write_wandb_csv(log)
  status = _cli.main([
      "replay", str(log), "--norm-column", "train/grad_norm", "--loss-column",
      "train/loss", "--step-column", "_step", "--methods", "zclip,clip@1",
      "--out", str(out)])
  assert status == 0
  text = capsys.readouterr().out
  with open(out / "replay.csv") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == [
      "step", "grad_norm", "zclip/threshold", "zclip/out_norm",
      "zclip/clipped", "clip@1/threshold", "clip@1/out_norm",
      "clip@1/clipped", "zclip/capped", "clip@1/capped"]
  assert len(rows) == N  # one per logged norm; the evaluation rows are not
  assert [int(r["step"]) for r in rows] == list(range(0, 2 * N, 2))
  np.testing.assert_array_equal([float(r["grad_norm"]) for r in rows], G)
  _, ref_out, ref_clipped, ref_capped = _zclip_reference(G)
  np.testing.assert_allclose([float(r["zclip/out_norm"]) for r in rows],
                             ref_out, rtol=1e-4)
  assert [r["zclip/clipped"] for r in rows] == [
      "1" if c else "0" for c in ref_clipped]
  assert [r["zclip/capped"] for r in rows] == [
      "1" if c else "0" for c in ref_capped]
  with np.errstate(invalid="ignore"):
    np.testing.assert_allclose(
        [float(r["clip@1/out_norm"]) for r in rows],
        np.where(np.isfinite(G) & (G > 1), 1.0, G), rtol=1e-6)
  png = (out / "replay.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
  # What it prints: the open-loop caveat, the rows it left out, the gaps of
  # the steps (every other step), the non-finite steps and the table, whose
  # counts are the CSV's.
  flat = " ".join(text.split())
  assert "open loop" in flat and "not what the loss would have been" in flat
  assert "Left out 6 rows without a value in 'train/grad_norm'" in flat
  assert "a norm every 2 steps: a subsampled series" in flat
  assert "2 norms are NaN or Inf" in flat
  clipped = sum(ref_clipped)
  line = next(x for x in text.splitlines() if x.startswith("zclip "))
  assert f"{clipped} ({100 * clipped / N:.1f}%)" in line
  clip_line = next(x for x in text.splitlines() if x.startswith("clip@1 "))
  cut = G[np.isfinite(G) & (G > 1)]
  assert f"{cut.max():.2f}x" in clip_line
  assert f"{np.median(cut):.2f}x" in clip_line


def test_cli_without_matplotlib_writes_the_csv_and_says_how(
    tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  log = tmp_path / "norms.txt"
  log.write_text("\n".join(repr(float(x)) for x in G) + "\n")
  assert _cli.main(["replay", str(log), "--methods", "clip@1", "--out",
                       str(tmp_path)]) == 0
  text = capsys.readouterr().out
  assert ("No plot: matplotlib is not installed (pip install matplotlib"
          in " ".join(text.split()))
  assert (tmp_path / "replay.csv").exists()
  assert not (tmp_path / "replay.png").exists()


@pytest.mark.parametrize("content, args, says", [
    (None, [], "no such file"),
    ("_step,train/loss\n0,2.5\n", ["--norm-column", "train/grad_norm"],
     "has no column 'train/grad_norm' (--norm-column); its columns: _step, "
     "train/loss"),
    ("step,grad_norm\n0,1.5\n1,abc\n", [],
     "line 3: column 'grad_norm' holds 'abc', not a number"),
    ("step,grad_norm\n", [], "no norms to replay"),
    ("step,grad_norm\n0,\n1,\n", [], "no norms to replay"),
    ("1.0\n2.0\nx\n", [], "line 3: holds 'x', not a number"),
    ('{"grad_norm": 1.0}\n{"grad_norm": [1]}\n', [], "line 2: column "
     "'grad_norm' holds [1], not a number"),
    ("step,grad_norm\n0,-1.0\n", [], "the norm -1.0 is negative"),
    ('{\n  "global_step": 3\n}\n', [], "is a JSON object without "
     "log_history"),
    ("a,b\n1,2\n", [], "no column looks like the gradient norm; give it with "
     "--norm-column (its columns: a, b)"),
    ("1.0\n", ["--methods", "zclip,bogus"], "unknown method 'bogus'"),
    ("1.0\n", ["--methods", "adagc"], "AdaGC clips each tensor"),
    ("1.0\n", ["--methods", "zclip:alpha=2"], "`alpha` must be in the open "
     "interval (0, 1)"),
    ("1.0\n", ["--methods", "zclip:zthresh=2"], "zclip has no argument "
     "'zthresh'"),
    ("1.0\n", ["--methods", "clip"], "clip needs max_norm"),
    ("1.0\n", ["--methods", "alpha=0.9"], "does not follow a method"),
    ("1.0\n", ["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, capsys, content,
                                                  args, says):
  log = tmp_path / "run.csv"
  if content is not None:
    log.write_text(content)
  with (pytest.raises(SystemExit) if "--bogus" in args
        else contextlib.nullcontext()):
    status = _cli.main(["replay", str(log), *args, "--out",
                        str(tmp_path / "o")])
    assert status == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  (line,) = captured.err.splitlines()
  # A usage error is the parser's (the whole command line's), bad input
  # the replay's.
  prog = "optax-zclip" if "--bogus" in args else "optax-zclip replay"
  assert line.startswith(f"{prog}: error: ")
  assert says in line and "Traceback" not in line


def test_the_console_script_and_python_m_write_the_same_report(tmp_path):
  log = tmp_path / "norms.txt"
  log.write_text("0.5\n0.6\n4.0\n")
  script = pathlib.Path(sys.executable).parent / "optax-zclip"
  reports = {}
  for name, argv in {"script": [str(script)],
                     "module": [sys.executable, "-W", "error", "-m",
                                "optax_zclip"]}.items():
    out = tmp_path / name
    proc = subprocess.run(
        [*argv, "replay", str(log), "--methods", "clip@1", "--no-plot",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and "clip@1" in proc.stdout
    reports[name] = (proc.stdout.replace(str(out), "OUT"),
                     (out / "replay.csv").read_bytes())
  assert reports["script"] == reports["module"]
  # min(g, 1), by hand.
  assert reports["script"][1].decode().splitlines() == [
      "step,grad_norm,clip@1/threshold,clip@1/out_norm,clip@1/clipped,"
      "clip@1/capped",
      "0,0.5,1.0,0.5,0,0", "1,0.6,1.0,0.6,0,0", "2,4.0,1.0,1.0,1,1"]


def test_help_lists_the_replay_subcommand(capsys):
  with pytest.raises(SystemExit) as exit_:
    _cli.main(["--help"])
  assert exit_.value.code == 0
  text = capsys.readouterr().out
  assert text.startswith("usage: optax-zclip ")
  assert "replay    what each clipping rule would have done" in text


def test_replay_is_a_plain_function_and_no_module_is_named_like_it():
  assert importlib.util.find_spec("optax_zclip.replay") is None
  # Importing every module of the package leaves the attribute alone.
  for info in pkgutil.walk_packages(optax_zclip.__path__, "optax_zclip."):
    if info.name != "optax_zclip.__main__":
      importlib.import_module(info.name)
  assert inspect.isfunction(optax_zclip.replay)
  out = optax_zclip.replay(G, LOSSES, METHODS)
  assert list(out)[:2] == ["step", "grad_norm"] and len(out["step"]) == N


def _cap_run(tmp_path, capsys, norms, methods):
  log = tmp_path / "norms.txt"
  log.write_text("".join(f"{float(g)!r}\n" for g in norms))
  assert _cli.main(["replay", str(log), "--methods", methods, "--no-plot",
                    "--out", str(tmp_path / "out")]) == 0
  return " ".join(capsys.readouterr().out.split())


def test_the_report_says_when_the_cap_made_the_clips(tmp_path, capsys):
  # Norms about 1.85 with one spike: ZClip's default cap of 1 clips every
  # step; the z-score rule, with the cap off, clips the spike alone.
  rng = np.random.default_rng(0)
  norms = 1.85 + 0.15 * rng.standard_normal(200)
  norms[150] = 30.0
  assert norms.min() > 1.0
  text = _cap_run(tmp_path, capsys, norms,
                  "zclip,zclip:z_thresh=3,zclip:max_grad_norm=none,clip@1")
  for name in ("zclip", "zclip:z_thresh=3"):
    assert (f"Note: the cap max_grad_norm=1 made 200 of {name}'s 200 clips "
            f"(the median norm is {np.median(norms):.3g}, above the cap), and "
            "its z-score rule 0: replay ") in text
  assert ("replay zclip:max_grad_norm=none to see the adaptive rule alone"
          in text)
  assert ("replay zclip:z_thresh=3,max_grad_norm=none to see the adaptive "
          "rule alone") in text
  assert "zclip:max_grad_norm=none's" not in text
  assert "clip@1's" not in text  # a fixed threshold is its cap
  rows = {r["method"]: r for r in _report.summary_rows(
      optax_zclip.replay(norms, methods=["zclip", "zclip:max_grad_norm=none",
                                         "clip@1", "autoclip"]), 20)}
  assert rows["zclip"]["capped"] == rows["clip@1"]["capped"] == 200
  assert rows["zclip:max_grad_norm=none"]["capped"] == 0
  assert rows["zclip:max_grad_norm=none"]["clipped"] >= 1
  assert rows["autoclip"]["capped"] is None


def test_no_cap_note_when_the_norms_sit_below_the_cap(tmp_path, capsys):
  rng = np.random.default_rng(1)
  norms = 0.3 + 0.03 * rng.standard_normal(200)
  norms[120] = 5.0  # a spike, above the cap too: one clip of each kind
  text = _cap_run(tmp_path, capsys, norms, "zclip")
  assert "Note: the cap" not in text
