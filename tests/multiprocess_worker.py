"""Worker for tests/test_multiprocess.py: one process of a 2-process CPU jax.distributed run.

Usage: python multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_JSON MODE ARG
  MODE 'step':    ARG is the params .npz; one sharded SiRA step on a 2x2x2 mesh.
  MODE 'preempt': ARG is a work directory; three trainings with `train.train` (6 steps each): an
                  uninterrupted one, one where process 1 alone sends itself SIGTERM after step
                  SIGNAL_STEP, and the resume of that one. Each run's params go to
                  <ARG>/<run>_params<process>.npz.
(XLA_FLAGS with the local device count is set by the parent.)
"""
import json
import os
import signal
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIGNAL_STEP = 2
TRAIN_STEPS = 6


def sharded_step_result(params):
  from sira_jax import partitioning
  import sharded_step
  mesh = partitioning.make_mesh(data=2, expert=2, model=2)
  loss, grads, _ = sharded_step.run(mesh, process_local_batch=True,
                                    params=sharded_step.load_params(params))
  value, sums = sharded_step.summary(loss, grads)
  return {'loss': value, 'grad_summary': sums.tolist()}


def preemption_result(workdir):
  """{run: {stopped_by, step, losses {step: loss}}} for the runs 'full', 'part' and 'resumed'."""
  from jax.experimental import multihost_utils
  from sira_jax import train as train_lib
  import trainer_fixtures as fx
  fx.register_fixture_task()

  def preempt_process_1(step):
    if jax.process_index() == 1 and step == SIGNAL_STEP:
      os.kill(os.getpid(), signal.SIGTERM)

  def run(name, model_dir, on_step=None):
    res = train_lib.train(
        model_dir=os.path.join(workdir, model_dir), mixture_or_task_name=fx.FIXTURE_TASK,
        task_feature_lengths=fx.LENGTHS, train_steps=TRAIN_STEPS, batch_size=8,
        model_config=fx.tiny_config('sira', expert_dropout_rate=0.2, router_jitter=0.1),
        checkpoint_every=4, keep_checkpoints=3, log_every=1, progress_bar=False,
        tensorboard=False, learning_rate=1e-2, optimizer_name='adamw', on_step=on_step)
    params = multihost_utils.process_allgather(res.state.params, tiled=True)
    flat = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(workdir, f'{name}_params{jax.process_index()}.npz'), **flat)
    return {'stopped_by': res.stopped_by, 'step': res.step,
            'losses': {h['step']: h['loss'] for h in res.history}}

  return {'full': run('full', 'a'), 'part': run('part', 'b', preempt_process_1),
          'resumed': run('resumed', 'b')}


def main():
  port, pid, nproc, out, mode, arg = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                      sys.argv[4], sys.argv[5], sys.argv[6])
  from sira_jax import partitioning
  partitioning.initialize_distributed(f'127.0.0.1:{port}', num_processes=nproc, process_id=pid,
                                      cpu_collectives='gloo')
  assert jax.process_count() == nproc, jax.process_count()
  result = sharded_step_result(arg) if mode == 'step' else preemption_result(arg)
  with open(out, 'w') as f:
    json.dump(dict(result, process_index=jax.process_index(), global_devices=jax.device_count(),
                   local_devices=jax.local_device_count()), f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
