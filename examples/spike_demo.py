"""The spike demo's command: runs ``examples/spike_demo/main.py``.

The demo lives in the folder ``examples/spike_demo/`` (entry ``main.py``,
``train.py``, ``model.py``, ``data.py``, ``config.py``, ``plots.py``; see its
README.md). This file only keeps the command short:

  python examples/spike_demo.py            # defaults, ~6 minutes on 2 cores
  python examples/spike_demo.py --seeds 1 --methods zclip,clip --out runs/x

It puts that folder on ``sys.path`` (the demo's modules import each other by
their plain names) and loads ``main.py`` by its path: a plain ``import`` could
not name it, since ``spike_demo`` is this file, and ``main`` may be some other
module already imported. Importing this file gives the demo's `main`.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

_DEMO_DIR = pathlib.Path(__file__).resolve().parent / "spike_demo"


def _load_main():
  if str(_DEMO_DIR) not in sys.path:
    sys.path.insert(0, str(_DEMO_DIR))
  name = "spike_demo_main"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, _DEMO_DIR / "main.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first, as `import` does
    try:
      spec.loader.exec_module(module)
    except BaseException:
      del sys.modules[name]
      raise
  return sys.modules[name]


main = _load_main().main

if __name__ == "__main__":
  main()
