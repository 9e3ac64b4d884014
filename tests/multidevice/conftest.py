"""Runs this folder with 8 simulated CPU devices (see ../test_multidevice.py).

Run it alone with
``OPTAX_ZCLIP_MULTIDEVICE=1 python -m pytest tests/multidevice``.
"""

import os

import jax
import meshes
import pytest

# Before JAX starts its backend (importing it does not).
os.environ["XLA_FLAGS"] = meshes.xla_flags()


@pytest.fixture(scope="session", autouse=True)
def _all_the_devices():
  if jax.device_count() != meshes.DEVICES:
    pytest.fail(f"expected {meshes.DEVICES} CPU devices, got "
                f"{jax.devices()}: JAX started before this conftest could "
                "ask for them")
