"""``python -m optax_zclip``: the ``optax-zclip`` command."""

import sys

from optax_zclip._cli import main

if __name__ == "__main__":
  sys.exit(main())
