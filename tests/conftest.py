"""Shared pytest configuration.

The tests under ``multidevice/`` need 8 simulated CPU devices, which must be
requested before JAX starts; `test_multidevice.py` runs them in a subprocess
with that setting, so the rest of the suite keeps one device.
"""

import os

if os.environ.get("OPTAX_ZCLIP_MULTIDEVICE") != "1":
  collect_ignore = ["multidevice"]
