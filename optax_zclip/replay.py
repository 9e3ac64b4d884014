"""The command ``python -m optax_zclip.replay LOG ...``: replay a logged run.

Reads the gradient norms (and losses) of a run you logged, replays them
through each clipping rule of the package with `optax_zclip.replay`, and
writes ``replay.csv``, ``replay.png`` and a table; ``--help`` says how.

The package's attribute ``optax_zclip.replay`` is that function. Importing
this module (``import optax_zclip.replay``) makes Python set the attribute
to the module instead, so the module is made callable: calling it calls the
function, and ``optax_zclip.replay(norms, ...)`` works either way.
"""

import sys
import types

from optax_zclip import _replay
from optax_zclip._replay import main, replay

__all__ = ["main", "replay"]


class _CallableModule(types.ModuleType):
  """This module, which calls `optax_zclip.replay` when called."""

  def __call__(self, *args, **kwargs):
    return _replay.replay(*args, **kwargs)


if __name__ == "__main__":
  sys.exit(main())
else:
  sys.modules[__name__].__class__ = _CallableModule
