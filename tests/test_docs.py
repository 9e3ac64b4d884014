"""The documentation keeps up with the package.

The Sphinx build (``.ci/run``) fails on these too; here they fail in seconds,
without Sphinx installed.
"""

import inspect
import pathlib
import re
import sys

import pytest

import optax_zclip

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

import api_coverage  # noqa: E402


def _api_directives() -> list[str]:
  names = []
  for page in sorted((ROOT / "docs" / "api").glob("*.rst")):
    names += re.findall(r"^\.\. auto(?:function|class|exception):: (\w+)\s*$",
                        page.read_text(), flags=re.M)
  return names


def test_every_public_name_has_exactly_one_api_entry():
  documented = _api_directives()
  assert sorted(documented) == sorted(optax_zclip.__all__)


def test_every_argument_and_state_field_is_described():
  assert api_coverage.missing_documentation() == []


def test_the_coverage_check_finds_an_undescribed_argument(monkeypatch):
  def my_clip(max_norm, *, axis_name=None):
    """Clips.

    Args:
      max_norm: the norm.
    """
    del max_norm, axis_name

  monkeypatch.setattr(optax_zclip, "my_clip", my_clip, raising=False)
  monkeypatch.setattr(optax_zclip, "__all__", [*optax_zclip.__all__, "my_clip"])
  assert api_coverage.missing_documentation() == [
      "optax_zclip.my_clip: argument `axis_name` is not in its docstring's "
      "Args section"]


@pytest.mark.parametrize("field", ["count", "restart_count"])
def test_the_coverage_check_finds_an_undescribed_field(monkeypatch, field):
  # Dedented, as api_coverage reads it: Python 3.13 strips a docstring's
  # indentation itself, older releases keep the class body's.
  doc = inspect.cleandoc(optax_zclip.ZClipState.__doc__)
  start = doc.index(f"\n  {field}:") + 1
  end = doc.index("\n  ", start)  # the end of the field's first line
  cut = doc[:start] + doc[end + 1:]
  monkeypatch.setattr(optax_zclip.ZClipState, "__doc__", cut)
  assert api_coverage.missing_documentation() == [
      f"optax_zclip.ZClipState: field `{field}` is not in its docstring's "
      "Attributes section"]


def test_readme_is_a_front_page_and_ci_runs_its_test_command():
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 200
  commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)[:2]
  assert commands[0].endswith("python examples/spike_demo.py")
  test_command = commands[1].split(" && ")[-1]
  assert test_command == "python -m pytest -q"
  ci = (ROOT / ".ci" / "run").read_text()
  assert re.search(rf"^{re.escape(test_command)}$", ci, flags=re.M)


def test_the_quickstart_names_the_defaults_that_decide_a_clip():
  # The quickstart's comment lists ZClip's defaults; the absolute cap, which
  # clips any step above it, is among them, with its real value.
  readme = (ROOT / "README.md").read_text()
  line = next(x for x in readme.splitlines()
              if "optax_zclip.zclip()" in x and "#" in x)
  shown = dict(kv.split("=") for kv in line.split("#")[1].split(", "))
  shown = {k.strip(): float(v) for k, v in shown.items()}
  defaults = inspect.signature(optax_zclip.zclip).parameters
  assert set(shown) == {"alpha", "z_thresh", "warmup_steps", "max_grad_norm"}
  for name, value in shown.items():
    assert defaults[name].default == value, name
  # No claim that there is nothing to set, with a fixed cap at 1.0.
  assert "no number to tune" not in readme
  assert "max_grad_norm=None" in readme.split("## Quickstart")[1]
