"""Test session setup: 8 simulated CPU devices for mesh tests, deterministic and quiet."""
import os

# Must happen before jax is imported anywhere: gives 8 host devices for sharding tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The suite's time is mostly XLA compiling small programs, once per shape and config: without
# XLA's backend optimisation passes they compile faster (the scan/remat tests: -33%). The
# programs compute the same functions (every numerical test compares within its tolerance); the
# optimised code users run is what the benchmarks under experiments/ measure. Subprocesses inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture
def clean_gin():
  """A cleared gin config before and after the test (modules opt in with
  `pytestmark = pytest.mark.usefixtures('clean_gin')`)."""
  import gin
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: absent under -p no:xdist
def pytest_xdist_make_scheduler(config, log):
  """`-n 2` (CI, the README) schedules by work stealing instead of xdist's default `load`: a
  worker that runs out of tests takes half of the other's queue, so the long tests queued on one
  worker near the end do not leave the other core idle. An explicit --dist is left as given."""
  if config.getvalue('dist') != 'load' or any(
      a == '-d' or a.startswith('--dist') for a in config.invocation_params.args):
    return None
  from xdist.scheduler import WorkStealingScheduling
  return WorkStealingScheduling(config, log)

