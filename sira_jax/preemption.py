"""Stopping training on SIGTERM or SIGINT: at the step reached, on one process or on all of them.

One process: `StopFlag` turns SIGTERM (a scheduler's preemption notice) and SIGINT (Ctrl-C) into a
flag that the loop reads between steps; it finishes the step, saves it and stops.

Several processes (`jax.distributed`): a signal usually reaches one process only (the preempted
host), yet the checkpoint save is collective, so every process must stop at the same step.
`StopAgreement` all-reduces each process's stop reason once per step, over one device per process,
and the loop fetches the result together with the step's metrics: every process learns the same
reason at the same step. A signal seen by the time a step is dispatched stops every process after
that step, so a multi-process run takes at most one step more than a single process would.

JAX's own preemption service: `jax.distributed.initialize` starts a preemption sync manager whose
notifier is a C-level SIGTERM handler. Python's `signal.signal` replaces that handler (and reports
the default as the previous one, which is what `StopFlag` restores on exit), so while `StopFlag`
is active the service never sees a SIGTERM; it also ignores SIGINT and picks its stop step by
timing (about a second after the signal, on CPU here). The loop therefore decides with the
all-reduce and also asks JAX's sync point (`multihost_utils.reached_preemption_sync_point`) every
step, which catches a SIGTERM that JAX's handler took before the loop began (during set-up or
compilation). That sync point stays set for the rest of the process.
"""
from __future__ import annotations

import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

STOP_SIGNALS = {signal.SIGTERM: 'sigterm', signal.SIGINT: 'sigint'}
# A stop reason's code in the all-reduce; the max wins, so SIGINT (exit 130) outranks SIGTERM.
STOP_REASONS = (None, 'sigterm', 'sigint')


class StopFlag:
  """While active (main thread only), SIGTERM and SIGINT (Ctrl-C) set `.raised` to 'sigterm' or
  'sigint' instead of killing or raising KeyboardInterrupt: the loop finishes its step, saves and
  stops. A second signal during that save changes nothing (the save completes). Restores the old
  handlers on exit."""

  def __init__(self):
    self.raised: str | None = None
    self._old = {}

  def __enter__(self):
    for sig in STOP_SIGNALS:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    self.raised = self.raised or STOP_SIGNALS[signum]

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class StopAgreement:
  """The stop reason of a multi-process run, the same on every process at every step.

  `dispatch(local_reason)` starts an all-reduce (max of `STOP_REASONS` codes) over the first device
  of each process and returns its int32 [] result without waiting; `reason(code, step)` turns the
  fetched code into the agreed reason, or 'sigterm' when JAX's preemption sync point says `step` is
  the step to stop at. Every process must call both once per step, in step order.
  """

  def __init__(self):
    first = {}
    for d in jax.devices():
      first.setdefault(d.process_index, d)
    self._mesh = Mesh(np.array([first[p] for p in sorted(first)]), ('process',))
    self._num_processes = len(first)
    self._local = NamedSharding(self._mesh, P('process'))
    self._max = jax.jit(lambda codes: jnp.max(codes), out_shardings=NamedSharding(self._mesh, P()))
    self._sync_point = bool(jax.config.jax_enable_preemption_service)

  def dispatch(self, local_reason: str | None) -> jax.Array:
    local = np.array([STOP_REASONS.index(local_reason)], np.int32)
    codes = jax.make_array_from_process_local_data(self._local, local, (self._num_processes,))
    with jax.set_mesh(self._mesh):  # in place of the run's mesh that the caller may have set
      return self._max(codes)

  def reason(self, code, step: int) -> str | None:
    agreed = STOP_REASONS[int(code)]
    if self._sync_point and multihost_utils.reached_preemption_sync_point(step):
      agreed = agreed or 'sigterm'
    return agreed
