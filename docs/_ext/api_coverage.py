"""Fails the docs build when the API reference falls behind the package.

Two checks, reported as Sphinx warnings (which ``-W`` turns into errors):

* every name in ``optax_zclip.__all__`` has an API entry whose anchor is
  ``optax_zclip.<name>``;
* every argument of every public function is described in its docstring's
  ``Args:`` section, and every field of every public state class in its
  ``Attributes:`` section, so that the rendered page mentions each of them.
"""

from __future__ import annotations

import inspect
import re

import optax_zclip


def _section(doc: str, title: str) -> str:
  """The text of a Google-style docstring section, or ''."""
  match = re.search(rf"^{title}:\n(.*?)(?=^\S|^ {{0,4}}[A-Z][a-z]+:\n|\Z)",
                    doc, flags=re.M | re.S)
  return match.group(1) if match else ""


def _described(names, section: str) -> list[str]:
  return [n for n in names
          if not re.search(rf"^\s+{re.escape(n)}(\s*\(.*?\))?:", section,
                           flags=re.M)]


def missing_documentation() -> list[str]:
  """What the docstrings fail to describe, as messages."""
  problems = []
  for name in optax_zclip.__all__:
    obj = getattr(optax_zclip, name)
    doc = inspect.cleandoc(obj.__doc__ or "")
    if not doc:
      problems.append(f"optax_zclip.{name} has no docstring")
      continue
    if inspect.isclass(obj) and hasattr(obj, "_fields"):
      for field in _described(obj._fields, _section(doc, "Attributes")):
        problems.append(f"optax_zclip.{name}: field `{field}` is not in its "
                        "docstring's Attributes section")
    elif inspect.isclass(obj) and issubclass(obj, Warning):
      continue  # a warning category: no arguments of its own
    elif callable(obj):
      params = [p.name for p in inspect.signature(obj).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
      for param in _described(params, _section(doc, "Args")):
        problems.append(f"optax_zclip.{name}: argument `{param}` is not in "
                        "its docstring's Args section")
  return problems


def _check(app, env) -> None:
  del app
  from sphinx.util import logging  # noqa: PLC0415 (the tests run without it)
  logger = logging.getLogger(__name__)
  documented = env.get_domain("py").objects
  for name in optax_zclip.__all__:
    if f"optax_zclip.{name}" not in documented:
      logger.warning("optax_zclip.%s is public (in __all__) but has no API "
                     "entry: add it to a page under docs/api/", name)
  for problem in missing_documentation():
    logger.warning(problem)


def setup(app):
  app.connect("env-check-consistency", _check)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
