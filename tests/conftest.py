"""Test configuration.

- Eight fake CPU devices, so the multi-device code (sharding, pipelining) is tested on a
  mesh under the one test command. The flag must be set before jax starts.
- Warnings are errors, and implicit rank promotion is refused, so silent broadcasting
  cannot hide a shape bug.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", "error")
