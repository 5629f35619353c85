"""Test session setup: 8 simulated CPU devices for mesh tests, deterministic and quiet."""
import os

# Must happen before jax is imported anywhere: gives 8 host devices for sharding tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture
def clean_gin():
  """A cleared gin config before and after the test (modules opt in with
  `pytestmark = pytest.mark.usefixtures('clean_gin')`)."""
  import gin
  gin.clear_config()
  yield
  gin.clear_config()
