"""Runs this folder with 8 simulated CPU devices (see ../test_multidevice.py).

Run it alone with
``OPTAX_ZCLIP_MULTIDEVICE=1 python -m pytest tests/multidevice``.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG)

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  if jax.device_count() != 8:
    pytest.fail(f"expected 8 CPU devices, got {jax.devices()}: JAX started "
                "before this conftest could ask for them")
