"""Test-wide setup: 4 fake CPU devices, so multi-device code runs in every test process.

XLA reads the flag when JAX initializes its backend, so it must be set before any test
module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
