"""Timing helpers shared by the benchmark parts: interleaved repeats, medians, machine load."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Mapping

import jax


def environment() -> dict:
  """What the numbers were measured on (recorded with every result file)."""
  return dict(backend=jax.default_backend(), devices=[str(d) for d in jax.devices()][:2],
              device_count=jax.device_count(), cpu_count=os.cpu_count(),
              jax=jax.__version__, python=platform.python_version(),
              machine=platform.machine(), xla_flags=os.environ.get('XLA_FLAGS', ''),
              gpu_lent=False)


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
  """Times every fn `repeats` times, round-robin (each round runs all fns once), after one warm
  call each. Returns name -> {median_s, min_s, times_s}; the load average before and after is in
  the '_load' entry. Ratios between names of one call are the figures to quote."""
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  load_before = load_average()
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  out = {name: dict(median_s=statistics.median(t), min_s=min(t), times_s=t)
         for name, t in times.items()}
  out['_load'] = dict(before=load_before, after=load_average())
  return out


def timed(fn: Callable[[], object]) -> tuple[object, float]:
  start = time.perf_counter()
  value = fn()
  return value, time.perf_counter() - start
